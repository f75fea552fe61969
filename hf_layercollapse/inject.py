"""Injecting collapsible units into a model (:func:`get_collapse_model`), refitting their targets, and the regulariser
that pulls them to linear."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .activation import CollapsibleActivation, inject_unit, injected_activations
from .calibration import fit_targets
from .checkpoint import record_unit
from .config import CollapseConfig
from .modules import WrappedActivation, set_module
from .record import UnitRecord
from .targets import target_for
from .units import Unit, check_not_moe, dummy_inputs, find_mlp_blocks, select_units

logger = logging.getLogger(__name__)


def check_not_shared(model: nn.Module, units: list[Unit]) -> None:
    """Refuse units whose projection weights are tied to modules outside the unit (merging would untie them)."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(name)
    for unit in units:
        inside = {f"{unit.name}.{p}" if unit.name else p for p in unit.layout.parts}
        for part in sorted(inside):
            for param in model.get_submodule(part).parameters(recurse=False):
                foreign = owners[id(param)] - inside
                if foreign:
                    raise ValueError(
                        f"The weights of {part!r} are shared with {sorted(foreign)}: collapsing block "
                        f"{unit.name!r} would untie them. Exclude it with exclude_modules=[{unit.name!r}]."
                    )


class _CallProbe(WrappedActivation):
    """Stands in a unit's activation for one forward pass, counting its calls."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation, self.calls = activation, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.activation(*args, **kwargs)


def check_called(model: nn.Module, units: list[Unit], example_inputs: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse units whose activation the forward pass reaches by another way than its registered place (a plain
    Python list of layers that the forward loops over, as some detection heads keep): an injected activation would
    never run, and the collapse would drop projections the forward still uses. One forward pass on
    ``example_inputs`` (or dummy inputs from the config) with a counting stand-in in each activation's place; units
    the pass does not reach at all (a vision tower given text) are not judged. Nothing to check without inputs."""
    try:
        with torch.random.fork_rng(devices=[]):  # random pixels must not move the user's seeded stream
            inputs = example_inputs if example_inputs is not None else dummy_inputs(model)
    except (ValueError, TypeError, AttributeError):
        return
    original_calls: dict[str, int] = {}
    probes, hooks = {}, []
    for unit in units:
        owner = unit.owner(model)
        original = owner.get_submodule(unit.layout.act)
        original_calls[unit.name] = 0

        def count(module, args, output, name=unit.name):
            original_calls[name] += 1
        hooks.append(original.register_forward_hook(count))
        probes[unit.name] = (owner, _CallProbe(original))
        set_module(owner, unit.layout.act, probes[unit.name][1])
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(**inputs)
    except Exception as err:  # a probe that cannot run leaves the check undone
        logger.debug("Activation calls not checked: the forward pass failed (%s: %s)", type(err).__name__, err)
        return
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
        for unit in units:
            owner, probe = probes[unit.name]
            set_module(owner, unit.layout.act, probe.activation)
    # the stand-in calls the original too: an original called while its stand-in never was is reached another way
    bypassed = [u.name for u in units if probes[u.name][1].calls == 0 and original_calls[u.name] > 0]
    if bypassed:
        raise ValueError(
            f"The forward pass calls the activations of blocks {bypassed} without going through their registered "
            "modules (the model keeps them in a plain Python list too): an injected activation would never run and "
            f"collapsing would be wrong. Leave them out with exclude_modules={bypassed}."
        )


def selected_units(model: nn.Module, config: CollapseConfig,
                   example_inputs: dict[str, torch.Tensor] | None = None) -> tuple[list[Unit], list[Unit]]:
    """The units of ``model`` that ``config`` selects, and those that its ``exclude_modules`` left out, with the
    errors every entry point gives: a mixture-of-experts model, no MLP block, nothing selected."""
    check_not_moe(model)
    units = find_mlp_blocks(model, example_inputs)
    if not units:
        raise ValueError(
            f"No MLP block (projection -> activation -> projection) was found in {type(model).__name__}; "
            "LayerCollapse needs at least one. If the model has MLPs with a functional activation "
            "(e.g. F.gelu called inline), they cannot be detected or wrapped."
        )
    candidates = select_units(units, config.target_modules, None, config.layers_to_transform)
    chosen = select_units(candidates, exclude_modules=config.exclude_modules)
    if not chosen:
        raise ValueError(
            "The config selects no MLP block (exclude_modules removed every block that the other selectors "
            f"kept); the model has {len(units)} blocks: {[u.name for u in units]}."
        )
    return chosen, [u for u in candidates if u not in chosen]


def get_collapse_model(
    model: nn.Module,
    config: CollapseConfig | None = None,
    example_inputs: dict[str, torch.Tensor] | None = None,
    calibration_data=None,
) -> nn.Module:
    """Make the selected MLP blocks of ``model`` collapsible, in place, and return the same model.

    Each selected block's activation is wrapped in a :class:`CollapsibleActivation` with one learnable α and the
    block's linear target (see :class:`~hf_layercollapse.LayerCollapseConfig`). With ``activation="blend"`` (the
    default) the model's outputs do not change until α moves.

    Args:
        model: A ``transformers`` model (any ``AutoModel``) or any module with fc → act → fc MLPs.
        config: Which blocks and how; default ``LayerCollapseConfig()`` (every MLP block, plain or gated, blend).
        example_inputs: One batch for the data-flow tracer, needed only for architectures that are not in
            :data:`~hf_layercollapse.units.MLP_LAYOUTS` and whose inputs cannot be guessed.
        calibration_data: Batches (or a dataset) of model inputs. Gated blocks (Llama, Mistral, Qwen, Gemma,
            Phi-3, gated T5): the gate constant ``c`` starts as the per-channel mean of ``act(gate(x))`` on them
            (without them, over ``example_inputs`` or a small dummy batch, a rough estimate; training then learns
            ``c`` with α). With ``config.linear_target="fitted"`` or ``"affine"`` (required then) every block's
            linear target is fitted on them.

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
    config = config if config is not None else CollapseConfig()
    if not isinstance(config, CollapseConfig):
        raise TypeError(f"config must be a hf_layercollapse.LayerCollapseConfig, got {type(config).__name__}"
                        + (": build one with LayerCollapseConfig(**your_dict)." if isinstance(config, dict) else "."))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}"
                        + (": load it first, e.g. AutoModel.from_pretrained(name)." if isinstance(model, str) else "."))
    if getattr(config, "lora_config", None) is not None:
        raise ValueError(
            "config.lora_config is set but get_collapse_model does not add LoRA layers: use "
            "hf_layercollapse.get_lora_collapse_model(model, lora_config, collapse_config) (or "
            "peft.get_peft_model(model, config)) for LoRA + LayerCollapse."
        )
    units, _ = selected_units(model, config, example_inputs)
    targets = {unit: target_for(unit.layout, config.linear_target, config.activation, config.affine_rank)
               for unit in units}
    injected = [u.name for u in units if isinstance(u.owner(model).get_submodule(u.layout.act), WrappedActivation)]
    if injected:
        raise ValueError(
            f"Blocks {injected} already have collapsible activations: get_collapse_model was applied twice. "
            "Use the model as it is, or select other blocks with target_modules/layers_to_transform."
        )
    check_not_shared(model, units)
    check_called(model, units, example_inputs)
    if config.linear_target != "default" and calibration_data is None:
        raise ValueError(f"linear_target={config.linear_target!r} fits each block's linear target on calibration "
                         "data: pass calibration_data= (a few hundred examples of your task), or use "
                         "linear_target='default'.")
    tensors = fit_targets(model, targets, calibration_data, example_inputs)
    for unit, target in targets.items():
        inject_unit(model, unit, target, tensors[unit.name], config.init_alpha)
        record_unit(model, unit.name, UnitRecord("injected", unit.layout, target=target), config)
    return model


@torch.no_grad()
def refit_linear_targets(model: nn.Module, calibration_data, blocks: list[str] | None = None) -> list[str]:
    """Fit the linear targets of injected blocks again, on the model as it is now, over ``calibration_data``.

    The target is what a block blends towards: a plain block's per-channel line (``linear_target="fitted"``), a
    gated block's constant ``c`` (by the rule it was injected with) and the affine map of ``linear_target="affine"``.
    Fine-tuning moves the weights, so a target fitted at injection drifts away from the best one;
    :class:`~hf_layercollapse.LayerCollapseTrainer` (``calibration_data=``) calls this for each block when its α
    starts to move. Only blocks at α = 0 exactly are refitted: their output does not depend on the target, so
    refitting changes no output. Plain blocks blending towards the identity have nothing to fit. Under
    ``torch.distributed`` call it on every process: the targets are broadcast from rank 0.

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
    with_target = [n for n in names if acts[n].target.requests(acts[n].layout)]
    moved = [n for n in with_target if acts[n].alpha_value != 0.0]
    if moved and blocks is not None:
        logger.warning("refit_linear_targets: %s have α != 0 (their output depends on the target): not refitted.",
                       moved)
    chosen = [n for n in with_target if n not in moved]
    fitted = fit_targets(model, {Unit(n, i, acts[n].layout): acts[n].target for i, n in enumerate(chosen)},
                         calibration_data)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    for name in chosen:
        current = acts[name].target_tensors()
        for key, value in fitted[name].items():
            value = value.to(current[key].device, current[key].dtype)
            if distributed:
                torch.distributed.broadcast(value, src=0)  # every process holds the same target
            current[key].copy_(value)
    return chosen


def check_refittable(model: nn.Module) -> None:
    """Raise if ``model``'s targets cannot be refitted: PEFT LayerCollapse adapters keep theirs per adapter."""
    adapters = [n for n, act in injected_activations(model).items() if not isinstance(act, CollapsibleActivation)]
    if adapters:
        raise ValueError(f"{adapters[0]} (and {len(adapters) - 1} more) are PEFT LayerCollapse layers: their "
                         "targets are not refitted during training; fit their targets (gate constants and fitted "
                         "lines) once, before training, with hf_layercollapse.calibrate_linear_targets.")


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """``Σ (1−α)²`` over the model's collapsible units (multiply by λ = ``reg_weight`` yourself, or let
    :class:`~hf_layercollapse.LayerCollapseTrainer` do it).

    The terms are the ones recorded by the latest forward pass, so the sum stays correct under DDP, FSDP and
    ZeRO-3; a unit that did not run since the last call contributes its term computed from α.
    """
    terms = [act.regularization_term() for act in injected_activations(model).values()]
    if not terms:
        raise ValueError(
            f"{type(model).__name__} has no collapsible activations: call get_collapse_model(model, config) first."
        )
    return torch.stack([t.float() for t in terms]).sum()
