"""LoRA + LayerCollapse, for models too big to fine-tune in full: LoRA layers and α in one PEFT adapter, targets fitted
on the base model, and one compact checkpoint at the end (LoRA merged first, blocks collapsed then)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from ..activation import injected_activations
from ..collapse import collapse_model
from ..report import CollapseReport
from ..units import Unit
from .config import LayerCollapseConfig
from .layer import PEFT_PREFIX, LayerCollapseLayer
from .model import LayerCollapseModel, base_model_targets


def get_lora_collapse_model(
    model: PreTrainedModel,
    lora_config: LoraConfig | dict[str, Any],
    collapse_config: LayerCollapseConfig | None = None,
    adapter_name: str = "default",
    calibration_data=None,
    **kwargs: Any,
) -> PeftModel:
    """Wrap ``model`` for LoRA + LayerCollapse fine-tuning: frozen base weights; trainable LoRA, α (and the gate
    constants ``c`` of gated blocks) and ``modules_to_save`` (e.g. a new head), all in one PEFT adapter.

    Save with ``peft_model.save_pretrained(dir)`` (LoRA, α, gate constants and saved modules), reload with
    ``PeftModel.from_pretrained(base, dir)`` or ``AutoPeftModelFor...from_pretrained(dir)``; at the end
    :func:`merge_lora_and_collapse` (or ``peft_model.merge_and_unload()``) gives one compact ``transformers``
    checkpoint. LoRA may target the projections of collapsible blocks too: they are merged before the blocks are.

    Args:
        model: A ``transformers`` model (its MLP blocks are found before LoRA wraps any projection).
        lora_config: A ``peft.LoraConfig`` (``target_modules``, ``r``, ``lora_alpha``...). Its ``task_type`` and
            ``modules_to_save`` become the adapter's.
        collapse_config: Which blocks and how (default ``LayerCollapseConfig()``: every MLP block, plain or gated;
            blend).
        adapter_name: The PEFT adapter name.
        calibration_data: Batches (or a dataset) on which the targets are fitted (:func:`calibrate_linear_targets`;
            ignored when the adapter has none: plain blocks with ``linear_target="default"``): ``c`` of the gated
            blocks (the per-channel mean of ``act(gate(x))`` of the base model, or its least-squares fit with
            ``linear_target="fitted"``) and, with ``"fitted"`` (then required), the lines of the plain blocks.
            Without it, ``c`` is the mean over a dummy batch, as in :func:`~hf_layercollapse.get_collapse_model`.
            With ``peft.get_peft_model``, call :func:`calibrate_linear_targets` yourself before training.
        kwargs: Passed to ``peft.get_peft_model`` (``autocast_adapter_dtype``, ``low_cpu_mem_usage``...).

    Returns:
        The ``PeftModel`` (``PeftModelForSequenceClassification`` etc. when a ``task_type`` is set).

    Example:
        >>> import torch
        >>> from peft import LoraConfig
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> import hf_layercollapse as hlc
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=50)).eval()
        >>> peft_model = hlc.get_lora_collapse_model(
        ...     model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
        ...     hlc.LayerCollapseConfig(layers_to_transform=[-1]))
        >>> trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        >>> [sum(key in n for n in trainable) for key in ("lora_", "layercollapse_alpha", "classifier")]
        [8, 1, 2]
        >>> len(hlc.injected_activations(peft_model))
        1
    """
    if not isinstance(lora_config, (LoraConfig, dict)):
        raise TypeError(f"lora_config must be a peft.LoraConfig (or the dict of its fields), got {type(lora_config)}.")
    collapse_config = collapse_config if collapse_config is not None else LayerCollapseConfig()
    if not isinstance(collapse_config, LayerCollapseConfig):
        raise TypeError(f"collapse_config must be a hf_layercollapse.LayerCollapseConfig, got "
                        f"{type(collapse_config).__name__}.")
    if collapse_config.lora_config is not None:
        raise ValueError("collapse_config already has a lora_config: pass the LoRA settings once.")
    if collapse_config.linear_target == "fitted" and calibration_data is None:
        raise ValueError("linear_target='fitted' fits the lines and gate constants on calibration data: pass "
                         "calibration_data= (a few hundred examples of your task), or use linear_target='default'.")
    config = replace(collapse_config, lora_config=lora_config)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    if calibration_data is not None and _layers_with_targets(peft_model.base_model, adapter_name):
        calibrate_linear_targets(peft_model, calibration_data, adapter_name)
    return peft_model


def _layers_with_targets(tuner: LayerCollapseModel, adapter: str) -> dict[str, LayerCollapseLayer]:
    """The layers of ``adapter`` whose target has something to fit (a gated block's ``c``, a plain block's line)."""
    return {owner: layer for owner, layer in injected_activations(tuner.model).items()
            if isinstance(layer, LayerCollapseLayer) and adapter in layer.layercollapse_target
            and layer.layercollapse_target[adapter].requests(layer.layout)}


def calibrate_linear_targets(
    peft_model: PeftModel, calibration_data, adapter_name: str | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Fit the linear targets of a LayerCollapse adapter on the base model (every adapter switched off) over
    ``calibration_data``, padding excluded, as the adapter config's ``linear_target`` says: the gate constant ``c``
    of each gated block (the per-channel mean of ``act(gate(x))``, or with ``"fitted"`` the least-squares fit of the
    block's output) and, with ``"fitted"``, the line of each plain block (each channel's least-squares line of its
    activation). The rule of :func:`~hf_layercollapse.get_collapse_model` with ``calibration_data``, for PEFT
    models; call it after ``peft.get_peft_model`` and before training (:func:`get_lora_collapse_model` takes
    ``calibration_data`` and calls it).

    Args:
        peft_model: A ``PeftModel`` with a LayerCollapse adapter on gated MLP blocks or fitted plain ones.
        calibration_data: A ``datasets.Dataset`` (padded to a fixed length), a ``DataLoader`` or batches (dicts of
            tensors) for the base model's ``forward``.
        adapter_name: The adapter whose targets are set (default: the active one).

    Returns:
        The new target tensors per block name (relative to the base model), by tensor name (``gate_constant``;
        ``slope`` and ``offset``).

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from transformers import LlamaConfig, LlamaModel
        >>> import hf_layercollapse as hlc
        >>> model = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                                intermediate_size=64)).eval()
        >>> peft_model = get_peft_model(model, hlc.LayerCollapseConfig())
        >>> means = hlc.calibrate_linear_targets(peft_model, [{"input_ids": torch.tensor([[1, 2, 3, 4]])}])
        >>> act = hlc.injected_activations(peft_model)["base_model.model.layers.0.mlp"]
        >>> sorted(means), torch.equal(act.target_tensors()["gate_constant"], means["layers.0.mlp"]["gate_constant"])
        (['layers.0.mlp', 'layers.1.mlp'], True)
    """
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(peft_model, PeftModel) or not isinstance(tuner, LayerCollapseModel):
        raise TypeError(f"calibrate_linear_targets takes a PeftModel with a LayerCollapse adapter, got "
                        f"{type(peft_model).__name__}; without PEFT pass calibration_data to get_collapse_model.")
    adapter = adapter_name if adapter_name is not None else tuner.active_adapters[0]
    if adapter not in tuner.peft_config:
        raise ValueError(f"Adapter {adapter!r} does not exist; this model has {list(tuner.peft_config)}.")
    layers = _layers_with_targets(tuner, adapter)
    if not layers:
        raise ValueError(f"Adapter {adapter!r} has no gated MLP block and no fitted line (linear_target='default' on "
                         "plain blocks blends towards the identity): there is no target to calibrate.")
    targets = {Unit(owner, i, layer.layout): layer.layercollapse_target[adapter]
               for i, (owner, layer) in enumerate(layers.items())}
    fitted = base_model_targets(tuner.model, targets, calibration_data)
    with torch.no_grad():
        for owner, layer in layers.items():
            for name, value in fitted[owner].items():
                getattr(layer, PEFT_PREFIX + name)[adapter].copy_(value)
            layer.layercollapse_calibrated.add(adapter)
    return fitted


def merge_lora_and_collapse(
    peft_model: PeftModel,
    threshold: float | None = None,
    blocks: list[str] | None = None,
    force: bool = False,
    return_report: bool = False,
) -> PreTrainedModel | tuple[PreTrainedModel, CollapseReport]:
    """Merge the LoRA layers into the base weights, then collapse the MLP blocks whose α is within ``threshold``;
    return the plain ``transformers`` model (``save_pretrained`` → ``AutoModelFor...from_pretrained``).

    Works on a :func:`get_lora_collapse_model` / ``get_peft_model(model, LayerCollapseConfig)`` model, and on a plain
    LoRA ``PeftModel`` around a model prepared by :func:`~hf_layercollapse.get_collapse_model`. Merging comes first,
    so LoRA on the projections of a collapsed block is part of the merged block.

    Args:
        peft_model: The PEFT-wrapped model (it is consumed: use the returned model).
        threshold: τ; default: the adapter's (or the injection config's) threshold.
        blocks: Collapse only these blocks (see :func:`~hf_layercollapse.collapse_model`).
        force: Collapse the named blocks even when α is far from 1.
        return_report: Also return the :class:`~hf_layercollapse.CollapseReport`.

    Example:
        >>> import torch
        >>> from peft import LoraConfig
        >>> from transformers import BertConfig, BertModel
        >>> import hf_layercollapse as hlc
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64)).eval()
        >>> peft_model = hlc.get_lora_collapse_model(model, LoraConfig(target_modules=["intermediate.dense"]))
        >>> for act in hlc.injected_activations(peft_model).values():
        ...     _ = act.alpha.data.fill_(1.0)
        >>> merged, report = hlc.merge_lora_and_collapse(peft_model, return_report=True)
        >>> len(report.collapsed), any("lora" in n for n, _ in merged.named_parameters())
        (2, False)
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"merge_lora_and_collapse takes a peft.PeftModel, got {type(peft_model).__name__}; for a "
                        "model without PEFT use hf_layercollapse.collapse_model.")
    tuner = peft_model.base_model
    if isinstance(tuner, LayerCollapseModel):
        model, report = tuner.merge_and_collapse(threshold=threshold, blocks=blocks, force=force)
    else:
        model = peft_model.merge_and_unload()
        report = collapse_model(model, blocks=blocks, threshold=threshold, force=force)
    return (model, report) if return_report else model
