"""Injecting collapsible activations into a model, and the regulariser that pulls them to linear."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .activation import CollapsibleActivation
from .architectures import BlockKind, MLPBlock, check_not_moe, find_mlp_blocks, select_blocks
from .calibration import activation_lines, affine_targets, gate_constants
from .config import LayerCollapseConfig
from .plan import record_block, set_module

logger = logging.getLogger(__name__)


def injected_activations(model: nn.Module) -> dict[str, CollapsibleActivation]:
    """Every :class:`CollapsibleActivation` in ``model``, keyed by the name of its MLP block."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, CollapsibleActivation):
            suffix = "." + module.layout.act
            owner = name[: -len(suffix)] if name.endswith(suffix) else ("" if name == module.layout.act else name)
            found[owner] = module
    return found


def check_gated_mode(blocks: list[MLPBlock], activation: str) -> None:
    """Refuse ``activation="prelu"`` on gated blocks (their gate is blended towards a constant)."""
    gated = [b.name for b in blocks if b.kind is BlockKind.GATED]
    if gated and activation != "blend":
        raise ValueError(
            f"activation={activation!r} cannot be used on gated MLP blocks ({gated[0]}, ...): a gated block "
            "collapses by blending its gate towards a constant (activation='blend'). Use 'blend', or select plain "
            "blocks only."
        )


def _check_supported(blocks: list[MLPBlock], model: nn.Module, config: LayerCollapseConfig) -> None:
    check_gated_mode(blocks, config.activation)
    injected = [b.name for b in blocks if isinstance(model.get_submodule(b.path("act")), CollapsibleActivation)]
    if injected:
        raise ValueError(
            f"Blocks {injected} already have collapsible activations: get_collapse_model was applied twice. "
            "Use the model as it is, or select other blocks with target_modules/layers_to_transform."
        )


def _check_not_shared(model: nn.Module, blocks: list[MLPBlock]) -> None:
    """Refuse blocks whose projection weights are tied to modules outside the block (merging would untie them)."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(name)
    for block in blocks:
        inside = {block.path(p) for p in ("fc1", "fc2", "gate") if getattr(block.layout, p) is not None}
        for part in inside:
            for param in model.get_submodule(part).parameters(recurse=False):
                foreign = {o for o in owners[id(param)] if not any(o == p for p in inside)}
                if foreign:
                    raise ValueError(
                        f"The weights of {part!r} are shared with {sorted(foreign)}: collapsing block "
                        f"{block.name!r} would untie them. Exclude it with exclude_modules=[{block.name!r}]."
                    )


def get_collapse_model(
    model: nn.Module,
    config: LayerCollapseConfig | None = None,
    example_inputs: dict[str, torch.Tensor] | None = None,
    calibration_data=None,
) -> nn.Module:
    """Make the selected MLP blocks of ``model`` collapsible, in place, and return the same model.

    Each selected block's activation is wrapped in a :class:`CollapsibleActivation` with one learnable α.
    With ``activation="blend"`` (the default) the model's outputs do not change until α moves.

    Args:
        model: A ``transformers`` model (any ``AutoModel``) or any module with fc → act → fc MLPs.
        config: Which blocks and how; default ``LayerCollapseConfig()`` (every plain MLP block, blend).
        example_inputs: One batch for the data-flow tracer, needed only for architectures that are not in
            :data:`~hf_layercollapse.architectures.MLP_LAYOUTS` and whose inputs cannot be guessed.
        calibration_data: Batches (or a dataset) of model inputs. Gated blocks (Llama, Mistral, Qwen, Gemma,
            Phi-3, gated T5): the gate constant ``c`` starts as the per-channel mean of ``act(gate(x))`` on them
            (without them, over ``example_inputs`` or a small dummy batch, a rough estimate; training then learns
            ``c`` with α). With ``config.linear_target="fitted"`` or ``"affine"`` (required then) every block's
            linear target is fitted on them (see :class:`~hf_layercollapse.LayerCollapseConfig`).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> import hf_layercollapse as hlc
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64)).eval()
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> before = model(ids).last_hidden_state
        >>> model = hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=-1))
        >>> torch.allclose(model(ids).last_hidden_state, before, atol=1e-6)
        True
        >>> float(hlc.regularization_loss(model))
        1.0
    """
    config = config or LayerCollapseConfig()
    check_not_moe(model)
    if config.lora_config is not None:
        raise ValueError(
            "config.lora_config is set but get_collapse_model does not add LoRA layers: use "
            "hf_layercollapse.get_lora_collapse_model(model, lora_config, collapse_config) (or "
            "peft.get_peft_model(model, config)) for LoRA + LayerCollapse."
        )
    blocks = find_mlp_blocks(model, example_inputs)
    if not blocks:
        raise ValueError(
            f"No MLP block (projection -> activation -> projection) was found in {type(model).__name__}; "
            "LayerCollapse needs at least one. If the model has MLPs with a functional activation "
            "(e.g. F.gelu called inline), they cannot be detected or wrapped."
        )
    selected = select_blocks(blocks, config.target_modules, config.exclude_modules, config.layers_to_transform)
    if not selected:
        raise ValueError(
            "The config selects no MLP block (exclude_modules removed every block that the other selectors "
            f"kept); the model has {len(blocks)} blocks: {[b.name for b in blocks]}."
        )
    _check_supported(selected, model, config)
    _check_not_shared(model, selected)
    fitted, affine = config.linear_target == "fitted", config.linear_target == "affine"
    if (fitted or affine) and calibration_data is None:
        raise ValueError(f"linear_target={config.linear_target!r} fits each block's linear target on calibration "
                         "data: pass calibration_data= (a few hundred examples of your task), or use "
                         "linear_target='default'.")
    affines = affine_targets(model, selected, calibration_data) if affine else {}
    constants = {} if affine else gate_constants(model, [b for b in selected if b.kind is BlockKind.GATED],
                                                 calibration_data, example_inputs,
                                                 method="least_squares" if fitted else "mean")
    lines = activation_lines(model, [b for b in selected if b.kind is BlockKind.PLAIN], calibration_data) if (
        fitted) else {}
    for block in selected:
        act_name = block.path("act")
        weight = model.get_submodule(block.path("fc1")).weight
        wrapped = CollapsibleActivation(model.get_submodule(act_name), config.activation, config.init_alpha,
                                        gate_constant=constants.get(block.name), line=lines.get(block.name),
                                        affine=affines.get(block.name))
        wrapped.layout = block.layout
        wrapped.fitted_gate = fitted and block.kind is BlockKind.GATED
        wrapped.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        set_module(model, act_name, wrapped)
        if affine:
            gate = model.get_submodule(block.path("gate")) if block.layout.gate is not None else None
            wrapped.attach(model.get_submodule(block.path("fc1")), model.get_submodule(block.path("fc2")), gate)
        target = {"line": True} if block.name in lines else {}  # apply_plan rebuilds the line's buffers
        target.update({"fitted_gate": True} if wrapped.fitted_gate else {})
        target.update({"affine": True} if affine else {})  # and the affine target's parameters
        record_block(model, block.name, block.layout, "injected", mode=config.activation, config=config, **target)
    return model


def check_refittable(model: nn.Module) -> None:
    """Raise if ``model``'s targets cannot be refitted: PEFT LayerCollapse adapters keep theirs per adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = [n for n, act in injected_activations(model).items() if isinstance(act, BaseTunerLayer)]
    if adapters:
        raise ValueError(f"{adapters[0]} (and {len(adapters) - 1} more) are PEFT LayerCollapse layers: their "
                         "targets are not refitted during training; fit their targets (gate constants and fitted "
                         "lines) once, before training, with hf_layercollapse.calibrate_linear_targets.")


@torch.no_grad()
def refit_linear_targets(model: nn.Module, calibration_data, blocks: list[str] | None = None) -> list[str]:
    """Fit the linear targets of injected blocks again, on the model as it is now, over ``calibration_data``.

    The target is what a block blends towards: a plain block's per-channel line (``linear_target="fitted"``), a
    gated block's constant ``c`` (the mean of ``act(gate(x))``, or with ``"fitted"`` its least-squares fit) and the
    affine map of ``linear_target="affine"`` (its relative least-squares fit). Fine-tuning moves the weights, so a
    target fitted at injection drifts away from the best one; :class:`~hf_layercollapse.LayerCollapseTrainer`
    (``calibration_data=``) calls this for each block when its α starts to move. Only blocks at α = 0 exactly are
    refitted: their output does not depend on the target, so refitting changes no output. Plain blocks blending
    towards the identity have nothing to fit. Under ``torch.distributed`` call it on every process: the targets are
    broadcast from rank 0.

    Args:
        model: A model prepared by :func:`get_collapse_model`.
        calibration_data: Batches (or a dataset) of model inputs, as for :func:`get_collapse_model`.
        blocks: Names of injected blocks (keys of :func:`injected_activations`); default: all of them.

    Returns:
        The names of the blocks whose target was refitted.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> import hf_layercollapse as hlc
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64)).eval()
        >>> data = [{"input_ids": torch.randint(0, 100, (4, 8))}]
        >>> config = hlc.LayerCollapseConfig(linear_target="fitted")
        >>> model = hlc.get_collapse_model(model, config, calibration_data=data)
        >>> with torch.no_grad():
        ...     _ = model.encoder.layer[0].intermediate.dense.weight.mul_(2.0)  # fine-tuning moved the weights
        >>> hlc.refit_linear_targets(model, data)
        ['encoder.layer.0', 'encoder.layer.1']
    """
    acts = injected_activations(model)
    names = list(acts) if blocks is None else list(blocks)
    unknown = [n for n in names if n not in acts]
    if unknown:
        raise ValueError(f"refit_linear_targets: {unknown} are not injected blocks; this model has {list(acts)}.")
    check_refittable(model)
    with_target = [n for n in names if acts[n].slope is not None or acts[n].target_parameters()]
    moved = [n for n in with_target if acts[n].alpha_value != 0.0]
    if moved and blocks is not None:
        logger.warning("refit_linear_targets: %s have α != 0 (their output depends on the target): not refitted.",
                       moved)
    chosen = [n for n in with_target if n not in moved]
    plain = [MLPBlock(n, i, acts[n].layout) for i, n in enumerate(chosen) if acts[n].slope is not None]
    gated = [MLPBlock(n, i, acts[n].layout) for i, n in enumerate(chosen) if acts[n].gate_constant is not None]
    affine = [MLPBlock(n, i, acts[n].layout) for i, n in enumerate(chosen) if acts[n].affine is not None]
    targets: dict[str, tuple[torch.Tensor, ...]] = dict(activation_lines(model, plain, calibration_data))
    targets.update(affine_targets(model, affine, calibration_data))
    for method, fitted in (("least_squares", True), ("mean", False)):  # each block by the rule it was injected with
        same = [b for b in gated if acts[b.name].fitted_gate == fitted]
        targets.update({name: (c,) for name, c in gate_constants(model, same, calibration_data, method=method).items()})
    for name, values in targets.items():
        act = acts[name]
        for buffer, value in zip(act.target_parameters() or (act.slope, act.offset), values):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(value, src=0)  # every process holds the same target
            buffer.copy_(value.to(buffer.device, buffer.dtype))
    return chosen


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """``Σ (1−α)²`` over the model's collapsible activations (multiply by λ = ``reg_weight`` yourself, or let
    :class:`~hf_layercollapse.LayerCollapseTrainer` do it).

    The terms are the ones recorded by the latest forward pass, so the sum stays correct under DDP, FSDP and
    ZeRO-3; an activation that did not run since the last call contributes its term computed from α.
    """
    terms = [act.regularization_term() for act in injected_activations(model).values()]
    if not terms:
        raise ValueError(
            f"{type(model).__name__} has no collapsible activations: call get_collapse_model(model, config) first."
        )
    return torch.stack([t.float() for t in terms]).sum()

