"""LayerCollapse as a PEFT method, and LoRA + LayerCollapse for models too big to fine-tune in full.

``import hf_layercollapse`` adds the key ``"LAYERCOLLAPSE"`` to PEFT's three registries (config class, tuner class,
state-dict prefix). ``peft.register_peft_method`` only accepts names of PEFT's closed ``PeftType`` enum, but
``PeftType`` is a ``str`` enum and the registries are plain dicts, so a plain string key works everywhere PEFT looks
a method up; PEFT itself is not modified. From then on a :class:`~hf_layercollapse.LayerCollapseConfig` works with
PEFT's own entry points:

* ``peft.get_peft_model(model, LayerCollapseConfig(...))``: the base model is frozen; each selected MLP block's
  activation is wrapped by a :class:`LayerCollapseLayer` holding one trainable α per adapter, and on a gated block
  (Llama, Mistral, Qwen2, Gemma, Phi-3, gated T5) one trainable gate constant ``c`` per adapter too (one value per
  intermediate channel; it starts at the mean of ``act(gate(x))`` over a dummy batch, as in
  :func:`~hf_layercollapse.get_collapse_model`, or over calibration data with :func:`calibrate_linear_targets`,
  which also fits the lines of plain blocks with ``linear_target="fitted"``).
* ``PeftModel.save_pretrained`` writes ``adapter_config.json`` and the α, ``c`` and fitted lines (and LoRA, and
  ``modules_to_save``) weights; ``PeftModel.from_pretrained`` and ``AutoPeftModelFor...from_pretrained`` rebuild
  them on a plain base.
* ``merge_and_unload()`` returns a plain ``transformers`` model in which the blocks within the threshold are
  collapsed, exactly as :func:`~hf_layercollapse.collapse_model` does, so it saves with ``save_pretrained`` and
  reloads with ``AutoModelFor...from_pretrained``. The other blocks keep their trained α as injected blocks.
  ``unload()`` gives the original model back.

LoRA + LayerCollapse (:func:`get_lora_collapse_model`): the LoRA layers are part of the LayerCollapse adapter
(``LayerCollapseConfig.lora_config``), so LoRA and α train together, are saved and loaded together by PEFT, and
``merge_and_unload()`` (or :func:`merge_lora_and_collapse`) merges LoRA into the base weights *first* and collapses
the blocks *then*: LoRA on the projections of a collapsed block is merged, never dropped.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, ClassVar

import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from peft.tuners.tuners_utils import set_adapter as _set_layers_adapter
from torch import nn
from transformers import PreTrainedModel

from .activation import CollapsibleActivation
from .architectures import BlockKind, Layout, MLPBlock, check_not_moe, find_mlp_blocks, select_blocks
from .calibration import activation_lines, gate_constants
from .collapse import collapse_model
from .config import ACTIVATIONS, PEFT_TYPE, LayerCollapseConfig
from .injection import _check_not_shared, check_gated_mode, injected_activations
from .modeling import LayerCollapseConfigError
from .plan import record_block, set_module
from .report import CollapseReport

logger = logging.getLogger(__name__)

__all__ = [
    "PEFT_PREFIX",
    "PEFT_TYPE",
    "LayerCollapseLayer",
    "LayerCollapseModel",
    "calibrate_linear_targets",
    "get_lora_collapse_model",
    "merge_lora_and_collapse",
    "register_peft_method",
]

#: Prefix of the LayerCollapse entries in PEFT state dicts (``...act.layercollapse_alpha``,
#: ``...act.layercollapse_gate_constant``, ``...act.layercollapse_slope`` / ``_offset``).
PEFT_PREFIX = "layercollapse_"


class LayerCollapseLayer(CollapsibleActivation, BaseTunerLayer):
    """PEFT tuner layer around an MLP block's activation: a :class:`~hf_layercollapse.CollapsibleActivation` whose α
    lives in a ``ParameterDict`` keyed by adapter name (``layercollapse_alpha``), as PEFT expects. On a gated block
    the gate constant ``c`` does too (``layercollapse_gate_constant``, one value per intermediate channel): the
    layer computes ``(1−α)·act(gate(x)) + α·c``. On a plain block with ``linear_target="fitted"`` the adapter's
    fitted line is kept in ``layercollapse_slope`` / ``layercollapse_offset`` (fixed buffers, saved with the adapter).

    The original activation is ``base_layer``; ``alpha``, ``gate_constant``, ``mode`` and ``forward`` are those of
    the active adapter, so :func:`~hf_layercollapse.injected_activations`,
    :func:`~hf_layercollapse.regularization_loss` and :class:`~hf_layercollapse.LayerCollapseTrainer` work on PEFT
    models unchanged. With adapters disabled (or no adapter of this layer active) the layer is the original
    activation. Loading an adapter whose α, ``c`` or line does not fit the block raises
    :class:`~hf_layercollapse.LayerCollapseConfigError` naming the module.

    Args:
        base_layer: The original activation module.
        adapter_name: Name of the first adapter.
        layout: The MLP block's layout (where fc1, act and fc2 sit), used to find the block again when collapsing.
        mode: ``"blend"`` or ``"prelu"``.
        init_alpha: Initial α.
        gate_constant: Gated blocks only (required there): the initial ``c``.
        line: Plain blocks, ``mode="blend"``: ``(slope, offset)`` of the fitted line (default: the identity).

    Example:
        >>> import torch
        >>> from hf_layercollapse import LayerCollapseLayer
        >>> from hf_layercollapse.architectures import BlockKind, Layout
        >>> layer = LayerCollapseLayer(torch.nn.GELU(), "default", Layout(BlockKind.PLAIN, "fc1", "act", "fc2"))
        >>> x = torch.randn(3)
        >>> torch.equal(layer(x), torch.nn.functional.gelu(x)), layer.alpha_value
        (True, 0.0)
        >>> _ = layer.alpha.data.fill_(1.0)
        >>> torch.equal(layer(x), x)
        True
    """

    adapter_layer_names = ("layercollapse_alpha", "layercollapse_gate_constant")
    other_param_names = ("layercollapse_slope", "layercollapse_offset")
    # affine targets (linear_target="affine") are not offered through PEFT (LayerCollapseConfig refuses them there)
    affine_weight = affine_bias = None

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        layout: Layout,
        mode: str = "blend",
        init_alpha: float = 0.0,
        gate_constant: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        line: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.layercollapse_alpha = nn.ParameterDict()
        self.layercollapse_gate_constant = nn.ParameterDict()  # gated blocks only
        self.layercollapse_mode: dict[str, str] = {}
        self.layercollapse_slope = BufferDict(persistent=True)  # plain blocks with a fitted line only
        self.layercollapse_offset = BufferDict(persistent=True)
        # adapters whose line was fitted on real data (calibrate_linear_targets) or read from a checkpoint, not only
        # on the dummy batch of get_peft_model
        self.layercollapse_calibrated: set[str] = set()
        self.layout = layout
        self._regularization_term: torch.Tensor | None = None
        self.last_alpha: torch.Tensor | None = None
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, mode, init_alpha, gate_constant, device, dtype, line)

    def update_layer(
        self, adapter_name: str, mode: str, init_alpha: float, gate_constant: torch.Tensor | None = None,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
        line: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Add adapter ``adapter_name`` (its own α, on a gated block its own ``c``, on a plain block with a fitted
        target its own line) to this layer."""
        if mode not in ACTIVATIONS:
            raise ValueError(f"mode={mode!r} is not supported: use one of {ACTIVATIONS}.")
        gated = self.layout.kind is BlockKind.GATED
        if gated and mode != "blend":
            raise ValueError(f"mode={mode!r}: the gate of a gated MLP block can only be blended towards its constant "
                             "(mode='blend').")
        if gated and gate_constant is None:
            raise ValueError("A gated MLP block needs the initial gate constant of the adapter (gate_constant=).")
        if not gated and gate_constant is not None:
            raise ValueError("gate_constant is for gated MLP blocks; this block is plain.")
        if line is not None and (gated or mode != "blend"):
            raise ValueError("line=(slope, offset) is the target of a plain block's blend (mode='blend').")
        self.layercollapse_alpha[adapter_name] = nn.Parameter(
            torch.full((1,), float(init_alpha), device=device, dtype=dtype)
        )
        if gated:
            self.layercollapse_gate_constant[adapter_name] = nn.Parameter(
                gate_constant.detach().reshape(-1).to(device=device, dtype=dtype, copy=True)
            )
        if line is not None:
            for buffers, value in zip((self.layercollapse_slope, self.layercollapse_offset), line):
                buffers[adapter_name] = value.detach().reshape(-1).to(device=device, dtype=dtype, copy=True)
        self.layercollapse_mode[adapter_name] = mode
        self.set_adapter(self.active_adapters)

    def _adapter(self) -> str:
        present = [a for a in self.active_adapters if a in self.layercollapse_alpha]
        if len(present) > 1:
            raise ValueError(f"LayerCollapse adapters {present} are active together on one block; activate only one.")
        if present:
            return present[0]
        if not self.layercollapse_alpha:
            raise ValueError("This LayerCollapse layer holds no adapter.")
        return next(iter(self.layercollapse_alpha))

    @property
    def alpha(self) -> nn.Parameter:  # type: ignore[override]
        """α of the active adapter (shape ``(1,)``)."""
        return self.layercollapse_alpha[self._adapter()]

    @property
    def gate_constant(self) -> nn.Parameter | None:  # type: ignore[override]
        """``c`` of the active adapter (gated blocks; ``None`` on plain blocks)."""
        if self.layout.kind is not BlockKind.GATED:
            return None
        return self.layercollapse_gate_constant[self._adapter()]

    @property
    def slope(self) -> torch.Tensor | None:  # type: ignore[override]
        """Slope of the active adapter's fitted line (plain blocks with ``linear_target="fitted"``), else None."""
        adapter = self._adapter()
        return self.layercollapse_slope[adapter] if adapter in self.layercollapse_slope else None

    @property
    def offset(self) -> torch.Tensor | None:  # type: ignore[override]
        """Offset of the active adapter's fitted line, else None."""
        adapter = self._adapter()
        return self.layercollapse_offset[adapter] if adapter in self.layercollapse_offset else None

    @property
    def mode(self) -> str:  # type: ignore[override]
        return self.layercollapse_mode[self._adapter()]

    @property
    def activation(self) -> nn.Module:  # type: ignore[override]
        return self.base_layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters or not any(a in self.layercollapse_alpha for a in self.active_adapters):
            return self.base_layer(hidden_states)
        return super().forward(hidden_states)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "A LayerCollapse α cannot be merged into the weights in place: merging happens by collapsing whole MLP "
            "blocks. Use `model = peft_model.merge_and_unload()` (or hf_layercollapse.merge_lora_and_collapse)."
        )

    def unmerge(self) -> None:
        """Nothing to undo: LayerCollapse layers are never merged in place."""

    def delete_adapter(self, adapter_name: str) -> None:
        self.layercollapse_mode.pop(adapter_name, None)
        self.layercollapse_calibrated.discard(adapter_name)
        super().delete_adapter(adapter_name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # torch would report a wrong shape as "size mismatch for ...", after reading the whole state dict; say which
        # block the adapter does not fit, and why.
        for kind in self.adapter_layer_names + self.other_param_names:
            for adapter, param in getattr(self, kind).items():
                value = state_dict.get(f"{prefix}{kind}.{adapter}")
                if isinstance(value, torch.Tensor) and value.shape != param.shape:
                    what = "values" if kind == "layercollapse_alpha" else "intermediate channels"
                    raise LayerCollapseConfigError(
                        f"The adapter checkpoint's {kind} of {prefix.rstrip('.')!r} (adapter {adapter!r}) has shape "
                        f"{tuple(value.shape)}, but this MLP block needs {tuple(param.shape)} ({param.numel()} "
                        f"{what}): the adapter was trained on another model; nothing was loaded."
                    )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.layercollapse_calibrated.update(a for a in self.layercollapse_slope
                                             if f"{prefix}layercollapse_slope.{a}" in state_dict)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{a}: {float(p.detach().float()[0]):.4f}" for a, p in self.layercollapse_alpha.items())
        gated = "" if not self.layercollapse_gate_constant else ", gate_constant={" + ", ".join(
            f"{a}: [{p.numel()}]" for a, p in self.layercollapse_gate_constant.items()) + "}"
        lines = "" if not len(self.layercollapse_slope) else ", line={" + ", ".join(
            f"{a}: [{b.numel()}]" for a, b in self.layercollapse_slope.items()) + "}"
        return f"layout={self.layout.act!r}, alpha={{{adapters}}}{gated}{lines}"


def _select_targets(model: nn.Module, config: LayerCollapseConfig) -> tuple[dict[str, MLPBlock], set[str]]:
    """``{activation name: block}`` of the blocks ``config`` selects, and the activation names it excludes."""
    check_not_moe(model)
    blocks = find_mlp_blocks(model)
    if not blocks:
        raise ValueError(
            f"No MLP block (projection -> activation -> projection) was found in {type(model).__name__}; "
            "LayerCollapse needs at least one. Add the LayerCollapse adapter before other adapters (LoRA layers hide "
            "the projections from the block finder)."
        )
    selected = select_blocks(blocks, config.target_modules, None, config.layers_to_transform)
    kept = select_blocks(selected, None, config.exclude_modules, None)
    if not kept:
        raise ValueError(
            "The config selects no MLP block (exclude_modules removed every block that the other selectors kept); "
            f"the model has {len(blocks)} blocks: {[b.name for b in blocks]}."
        )
    check_gated_mode(kept, config.activation)
    fresh = [b for b in kept if not isinstance(model.get_submodule(b.path("act")), LayerCollapseLayer)]
    plain = [b.name for b in fresh if isinstance(model.get_submodule(b.path("act")), CollapsibleActivation)]
    if plain:
        raise ValueError(
            f"Blocks {plain} already have collapsible activations from get_collapse_model: use either "
            "get_collapse_model (full fine-tuning) or the PEFT adapter (get_peft_model / get_lora_collapse_model) on "
            "the original model, not both."
        )
    _check_not_shared(model, fresh)
    excluded = {b.path("act") for b in selected} - {b.path("act") for b in kept}
    return {b.path("act"): b for b in kept}, excluded


def _base_targets(model: nn.Module, gated: list[MLPBlock], plain: list[MLPBlock], calibration_data=None,
                  method: str = "mean") -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """The targets of the base model, keyed by block name: ``c`` of the ``gated`` blocks
    (:func:`~hf_layercollapse.calibration.gate_constants` with ``method``) and the fitted line ``(slope, offset)`` of
    the ``plain`` ones (:func:`~hf_layercollapse.calibration.activation_lines`), over ``calibration_data`` (default:
    a dummy batch). Every adapter layer (LayerCollapse, LoRA) is switched off during the pass, so that the targets
    start from the original model, as with :func:`~hf_layercollapse.get_collapse_model`."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    disabled = [m._disable_adapters for m in layers]
    try:
        for layer in layers:  # the flag only: enable_adapters() would also change which parameters are trainable
            layer._disable_adapters = True
        targets: dict[str, Any] = dict(gate_constants(model, gated, calibration_data, method=method))
        if plain:
            from .tracing import dummy_inputs

            data = calibration_data if calibration_data is not None else [dummy_inputs(model)]
            targets.update(activation_lines(model, plain, data))
        return targets
    finally:
        for layer, flag in zip(layers, disabled):
            layer._disable_adapters = flag


class LayerCollapseModel(BaseTuner):
    """The PEFT tuner of LayerCollapse (what ``peft.get_peft_model`` builds for a
    :class:`~hf_layercollapse.LayerCollapseConfig`); usually reached through the ``PeftModel``.

    Targets are found by hf_layercollapse's block finder (``target_modules``, ``exclude_modules`` and
    ``layers_to_transform`` select MLP *blocks*, see :class:`~hf_layercollapse.LayerCollapseConfig`), not by
    PEFT's per-model tables. When the config has a ``lora_config``, its LoRA layers are injected into the same
    adapter after the activations are wrapped.

    ``merge_and_unload()`` merges LoRA, then collapses the blocks within ``threshold`` and returns the plain model;
    the :class:`~hf_layercollapse.CollapseReport` is kept in ``collapse_report``.

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertModel
        >>> import hf_layercollapse as hlc
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64)).eval()
        >>> peft_model = get_peft_model(model, hlc.LayerCollapseConfig(layers_to_transform=-1))
        >>> type(peft_model.base_model).__name__, peft_model.get_nb_trainable_parameters()[0]
        ('LayerCollapseModel', 1)
        >>> _ = peft_model.base_model.model.encoder.layer[1].intermediate.intermediate_act_fn.alpha.data.fill_(1.0)
        >>> merged = peft_model.merge_and_unload()
        >>> report = peft_model.base_model.collapse_report
        >>> type(merged.encoder.layer[1].intermediate.dense).__name__, [row.name for row in report.collapsed]
        ('Identity', ['encoder.layer.1'])
    """

    prefix: str = PEFT_PREFIX
    # LayerCollapse layers and the LoRA layers of `lora_config` belong to the same adapter: set_adapter, freezing and
    # deletion must reach both kinds.
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    def _prepare_adapter_config(self, peft_config: LayerCollapseConfig, model_config: dict) -> LayerCollapseConfig:
        return peft_config  # blocks are found by structure, no per-model_type table of names is needed

    def _prepare_model(self, peft_config: LayerCollapseConfig, model: nn.Module) -> None:
        if peft_config.linear_target == "affine":
            raise ValueError("linear_target='affine' is not supported through PEFT (an adapter holds α, c and lines, "
                             "not a d×d map per block): use hf_layercollapse.get_collapse_model(model, config, "
                             "calibration_data=...), or linear_target='fitted' with PEFT.")
        self._targets, self._excluded = _select_targets(model, peft_config)
        # gated blocks: c starts at the mean of act(gate(x)) over a dummy batch (get_collapse_model's default); plain
        # blocks with linear_target="fitted": the line fitted on that batch. calibrate_linear_targets fits both on
        # calibration data, PeftModel.from_pretrained reads them from the checkpoint.
        gated = [b for b in self._targets.values() if b.kind is BlockKind.GATED]
        plain = [b for b in self._targets.values() if b.kind is BlockKind.PLAIN and peft_config.linear_target ==
                 "fitted"]
        self._initial_targets = _base_targets(model, gated, plain) if gated or plain else {}

    def _check_target_module_exists(self, peft_config: LayerCollapseConfig, key: str) -> bool | _ExcludedModule:
        if key in self._excluded:
            return _ExcludedModule()
        return key in self._targets

    def _create_and_replace(
        self,
        peft_config: LayerCollapseConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        block = self._targets[current_key]
        weight = self.model.get_submodule(block.path("fc1")).weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else None}
        initial = self._initial_targets.get(block.name)
        constant, line = (initial, None) if block.kind is BlockKind.GATED else (None, initial)
        if isinstance(target, LayerCollapseLayer):
            target.update_layer(adapter_name, peft_config.activation, peft_config.init_alpha, constant, line=line,
                                **factory)
            return
        layer = LayerCollapseLayer(target, adapter_name, block.layout, peft_config.activation, peft_config.init_alpha,
                                   constant, line=line, **factory)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # an additional adapter is not trainable until it is activated
        self._replace_module(parent, target_name, layer, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, LayerCollapseLayer) or isinstance(child, LayerCollapseLayer):
            # activations have no weight to take the device from (PEFT's version would look for one)
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        target_modules = config.target_modules  # PEFT may shorten long name lists: keep the user's selectors
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        finally:
            config.target_modules = target_modules
        lora = config.get_lora_config()
        if lora is not None:
            self._inject_lora(model, adapter_name, lora, low_cpu_mem_usage)

    def _inject_lora(self, model: nn.Module, adapter_name: str, lora: LoraConfig, low_cpu_mem_usage: bool) -> None:
        """Add the LoRA layers of the adapter (after the activations are wrapped: the block finder needs the plain
        projections). PEFT's LoRA tuner injects them; the model keeps this tuner's ``peft_config``."""
        # LoRA must not reach into modules trained in full (PEFT excludes modules_to_save from LoRA's targets)
        lora.modules_to_save = list(self.peft_config[adapter_name].modules_to_save or []) or None
        own = model.__dict__.pop("peft_config", None)
        try:
            inject_adapter_in_model(lora, model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        finally:
            model.__dict__.pop("peft_config", None)
            if own is not None:
                model.peft_config = own
        self.targeted_module_names.extend(
            n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A
            and n not in self.targeted_module_names
        )
        # LoRA's injection made `adapter_name` the active LoRA adapter: restore this tuner's active adapters.
        active = self.peft_config[self.active_adapters[0]] if self.active_adapters else None
        _set_layers_adapter(model, self.active_adapters, inference_mode=bool(active and active.inference_mode),
                            layer_cls=LoraLayer)

    # ------------------------------------------------------------------------------------------ merge / unload
    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if not merge:  # unload: original activations, LoRA removed
            return super()._unload_and_optionally_merge(False, progressbar, safe_merge, adapter_names)
        model, self.collapse_report = self.merge_and_collapse(
            adapter_names=adapter_names, progressbar=progressbar, safe_merge=safe_merge
        )
        return model

    def merge_and_collapse(
        self,
        adapter_names: list[str] | None = None,
        threshold: float | None = None,
        blocks: list[str] | None = None,
        force: bool = False,
        progressbar: bool = False,
        safe_merge: bool = False,
    ) -> tuple[nn.Module, CollapseReport]:
        """Merge LoRA, replace the LayerCollapse layers by plain collapsible activations with the trained α (and
        ``c``), then :func:`~hf_layercollapse.collapse_model` (``threshold``, ``blocks``, ``force`` are its
        arguments; the default threshold is the adapter's). Returns the unwrapped model and the report."""
        adapter = self._merge_adapter_name(adapter_names)
        config = self.peft_config[adapter]
        injected = []
        for name, layer in [(n, m) for n, m in self.model.named_modules() if isinstance(m, LayerCollapseLayer)]:
            if adapter not in layer.layercollapse_alpha:
                set_module(self.model, name, layer.base_layer)
                continue
            alpha = layer.layercollapse_alpha[adapter]
            constant = layer.layercollapse_gate_constant[adapter] if layer.layout.kind is BlockKind.GATED else None
            line = (layer.layercollapse_slope[adapter], layer.layercollapse_offset[adapter]) if (
                adapter in layer.layercollapse_slope) else None
            act = CollapsibleActivation(layer.base_layer, layer.layercollapse_mode[adapter], 0.0, constant, line)
            act.layout = layer.layout
            act.fitted_gate = constant is not None and config.linear_target == "fitted"
            owner = name[: -len(layer.layout.act) - 1] if name != layer.layout.act else ""
            weight = self.model.get_submodule(".".join(p for p in (owner, layer.layout.fc1) if p)).weight
            act.to(device=alpha.device, dtype=weight.dtype if weight.is_floating_point() else alpha.dtype)
            with torch.no_grad():
                act.alpha.copy_(alpha.detach())
            set_module(self.model, name, act)
            injected.append((owner, layer.layout, act.mode, {**({"line": True} if line is not None else {}),
                                                             **({"fitted_gate": True} if act.fitted_gate else {})}))
        lora_adapters = adapter_names if adapter_names is not None else [adapter]
        model = super()._unload_and_optionally_merge(True, progressbar, safe_merge, lora_adapters)
        for owner, layout, mode, target in injected:  # apply_plan rebuilds the line's buffers
            record_block(model, owner, layout, "injected", mode=mode, config=config, **target)
        report = collapse_model(model, blocks=blocks, threshold=config.threshold if threshold is None else threshold,
                                force=force)
        logger.info("LayerCollapse merge_and_unload:\n%s", report)
        return model, report

    def _merge_adapter_name(self, adapter_names: list[str] | None) -> str:
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapters {unknown} do not exist; this model has {list(self.peft_config)}.")
        if len(names) != 1:
            raise ValueError(
                f"merge_and_unload collapses with one LayerCollapse adapter, got {names}: pass adapter_names=[name]."
            )
        return names[0]


def register_peft_method() -> None:
    """Add LayerCollapse to PEFT's registries under ``peft_type="LAYERCOLLAPSE"`` (done on ``import
    hf_layercollapse``; calling it again is harmless).

    ``peft.register_peft_method`` only accepts members of PEFT's closed ``PeftType`` enum; ``PeftType`` is a ``str``
    enum, so a plain string key in the three mappings is found wherever PEFT looks a method up.

    Example:
        >>> from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        >>> import hf_layercollapse as hlc
        >>> PEFT_TYPE_TO_TUNER_MAPPING["LAYERCOLLAPSE"] is hlc.LayerCollapseModel
        True
    """
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = LayerCollapseConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = LayerCollapseModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PEFT_PREFIX


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
            ignored when the adapter has none: plain blocks with ``linear_target="default"``):
            ``c`` of the gated blocks (the per-channel mean of ``act(gate(x))`` of the base model, or its
            least-squares fit with ``linear_target="fitted"``) and, with ``"fitted"`` (then required), the lines
            of the plain blocks. Without it, ``c`` is the mean over a dummy batch, as in
            :func:`~hf_layercollapse.get_collapse_model`. With ``peft.get_peft_model``, call
            :func:`calibrate_linear_targets` yourself before training.
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
    if collapse_config.lora_config is not None:
        raise ValueError("collapse_config already has a lora_config: pass the LoRA settings once.")
    if collapse_config.linear_target == "fitted" and calibration_data is None:
        raise ValueError("linear_target='fitted' fits the lines and gate constants on calibration data: pass "
                         "calibration_data= (a few hundred examples of your task), or use linear_target='default'.")
    config = replace(collapse_config, lora_config=lora_config)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    if calibration_data is not None and _target_layers(peft_model.base_model, adapter_name):
        calibrate_linear_targets(peft_model, calibration_data, adapter_name)
    return peft_model


def _target_layers(tuner: LayerCollapseModel, adapter: str) -> dict[str, LayerCollapseLayer]:
    """The layers of ``adapter`` that have a target to fit (gated blocks, plain blocks with a fitted line)."""
    return {owner: layer for owner, layer in injected_activations(tuner.model).items()
            if isinstance(layer, LayerCollapseLayer) and (adapter in layer.layercollapse_gate_constant
                                                          or adapter in layer.layercollapse_slope)}


def calibrate_linear_targets(
    peft_model: PeftModel, calibration_data, adapter_name: str | None = None
) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
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
        The new targets per block name (relative to the base model): ``c`` of the gated blocks, ``(slope, offset)``
        of the plain ones.

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
        >>> sorted(means), torch.equal(act.gate_constant.data, means["layers.0.mlp"])
        (['layers.0.mlp', 'layers.1.mlp'], True)
    """
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(peft_model, PeftModel) or not isinstance(tuner, LayerCollapseModel):
        raise TypeError(f"calibrate_linear_targets takes a PeftModel with a LayerCollapse adapter, got "
                        f"{type(peft_model).__name__}; without PEFT pass calibration_data to get_collapse_model.")
    adapter = adapter_name if adapter_name is not None else tuner.active_adapters[0]
    if adapter not in tuner.peft_config:
        raise ValueError(f"Adapter {adapter!r} does not exist; this model has {list(tuner.peft_config)}.")
    layers = _target_layers(tuner, adapter)
    if not layers:
        raise ValueError(f"Adapter {adapter!r} has no gated MLP block and no fitted line (linear_target='default' on "
                         "plain blocks blends towards the identity): there is no target to calibrate.")
    blocks = [MLPBlock(owner, index, layer.layout) for index, (owner, layer) in enumerate(layers.items())]
    method = "least_squares" if tuner.peft_config[adapter].linear_target == "fitted" else "mean"
    targets = _base_targets(tuner.model, [b for b in blocks if b.kind is BlockKind.GATED],
                            [b for b in blocks if b.kind is BlockKind.PLAIN], calibration_data, method)
    with torch.no_grad():
        for owner, layer in layers.items():
            if layer.layout.kind is BlockKind.GATED:
                layer.layercollapse_gate_constant[adapter].copy_(targets[owner])
            else:
                layer.layercollapse_slope[adapter].copy_(targets[owner][0])
                layer.layercollapse_offset[adapter].copy_(targets[owner][1])
                layer.layercollapse_calibrated.add(adapter)
    return targets


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


def peft_collapse_config(model: nn.Module) -> LayerCollapseConfig | None:
    """The active :class:`~hf_layercollapse.LayerCollapseConfig` of a PEFT model, or ``None``."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    active = getattr(model, "active_adapters", None)
    names = active if isinstance(active, list) else list(configs)
    found = [configs[n] for n in names if isinstance(configs.get(n), LayerCollapseConfig)]
    return found[0] if found else None


def peft_trainer_settings(model: nn.Module) -> dict[str, Any]:
    """The LayerCollapse settings (``reg_weight``, ``threshold``...) of a PEFT model for the trainer, ``{}`` for a
    model without PEFT. Refuses a PEFT model whose α PEFT neither trains nor saves (another method's ``PeftModel``
    around a model prepared by ``get_collapse_model``)."""
    if not isinstance(model, PeftModel):
        return {}
    config = peft_collapse_config(model)
    if config is None and injected_activations(model):
        raise ValueError(
            f"This {model.peft_type} PeftModel wraps a model with collapsible activations, but PEFT froze their α and "
            "would not save it: build the model with hf_layercollapse.get_lora_collapse_model(model, lora_config, "
            "collapse_config) on the original model, so that LoRA and α train and save together."
        )
    dummy = [name for name, layer in injected_activations(model).items() if isinstance(layer, LayerCollapseLayer)
             and layer._adapter() in layer.layercollapse_slope.keys() - layer.layercollapse_calibrated]
    if dummy:
        logger.warning("The fitted lines of %s were fitted on get_peft_model's dummy batch only: call "
                       "hf_layercollapse.calibrate_linear_targets(peft_model, calibration_data) before training (or "
                       "pass calibration_data to get_lora_collapse_model).", dummy)
    return config.to_dict() if config is not None else {}


register_peft_method()
