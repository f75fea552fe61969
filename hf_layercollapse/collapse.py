"""`collapse_model`: merge, in place, every injected unit whose α reached 1 into one projection, and report it."""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
from torch import nn

from .activation import CollapsibleModule, injected_activations
from .checkpoint import record_unit
from .modules import module_order, projection_shape, set_module
from .record import CollapseRecord, UnitRecord
from .report import BlockReport, CollapseReport
from .units import Costs, Layout, Unit, dummy_inputs

logger = logging.getLogger(__name__)


def unit_costs(owner: nn.Module, layout: Layout, host: CollapsibleModule | None = None) -> Costs:
    """:class:`~hf_layercollapse.units.Costs` of merging the unit as :func:`collapse_model` would (towards ``host``'s
    target; without a host, the plain merge of its projections)."""
    merged_bias = host.target.merged_bias(layout, owner) if host is not None else layout.projection_bias(owner)
    return layout.costs(owner, merged_bias)


def unselected_rows(model: nn.Module, units: list[Unit]) -> list[BlockReport]:
    """Report rows of units left as they are: ``"kept"`` (not selected), or ``"skipped"`` when merging would not save
    parameters; α where the unit is injected."""
    injected = injected_activations(model)
    rows = []
    for unit in units:
        costs = unit_costs(unit.owner(model), unit.layout, injected.get(unit.name))
        saves = costs.params_after < costs.params_before
        status, reason = ("kept", "not selected") if saves else ("skipped", "merging would not save parameters")
        alpha = injected[unit.name].alpha_value if unit.name in injected else None
        rows.append(BlockReport(unit.name, unit.kind.value, alpha, status, reason, costs.params_before,
                                costs.params_before, costs.flops_before, costs.flops_before))
    return rows


def in_model_order(model: nn.Module, rows: list[BlockReport]) -> list[BlockReport]:
    """``rows`` sorted by where their units sit in ``model``."""
    order = module_order(model)
    return sorted(rows, key=lambda row: order.get(row.name, -1))


def model_params(model: nn.Module) -> int:
    """Parameters of the model's own architecture: the α and targets added by injection are not counted, so a
    report's savings compare with the original model."""
    added = {id(p) for m in model.modules() if isinstance(m, CollapsibleModule) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in model.parameters() if id(p) not in added)


def check_no_unmerged_adapters(model: nn.Module, units: list[Unit]) -> None:
    """Refuse to merge units whose modules are PEFT adapter layers (LoRA on a projection, a LayerCollapse adapter on
    the activation): merging would drop the adapters silently. They have to be merged into the weights first."""
    for unit in units:
        owner = unit.owner(model)
        wrapped = [part for part in unit.layout.parts if hasattr(owner.get_submodule(part), "base_layer")]
        if wrapped:
            raise ValueError(
                f"Block {unit.name!r}: {wrapped} are wrapped by PEFT adapter layers that are not merged (LoRA, or a "
                "LayerCollapse adapter); collapsing now would drop the adapters. Merge first, collapse then: "
                "`model = hf_layercollapse.merge_lora_and_collapse(peft_model)` (or `peft_model.merge_and_unload()`, "
                "which collapses LayerCollapse adapters too; for a LoRA-only PeftModel, collapse_model after it)."
            )


def install_merge(model: nn.Module, unit: Unit, merged: nn.Module, alpha: float | None = None,
                  method: str | None = None) -> None:
    """Put ``merged`` in ``unit``'s place and record the unit as collapsed."""
    unit.layout.install(unit.owner(model), merged)
    d_in, d_out = projection_shape(merged)
    record_unit(model, unit.name, UnitRecord("collapsed", unit.layout, alpha=alpha, in_features=d_in,
                                             out_features=d_out, bias=merged.bias is not None,
                                             projection=type(merged).__name__, method=method))


def collapse_model(
    model: nn.Module,
    blocks: list[str] | None = None,
    threshold: float | None = None,
    force: bool = False,
    plan=None,
    verify: bool = True,
) -> CollapseReport:
    """Merge, in place, every injected MLP block whose α is within ``threshold`` of 1 into one projection.

    With ``plan`` (a :class:`~hf_layercollapse.CollapsePlan` from :func:`~hf_layercollapse.plan_collapse`), merge
    the plan's blocks instead, each with the merge the planner chose (``plan.apply(model)``), no α needed.

    Args:
        model: A model prepared with :func:`~hf_layercollapse.get_collapse_model` (and usually fine-tuned).
        blocks: Names of blocks to collapse (full names, or suffixes such as ``"layer.11"``). ``None``: every
            injected block within the threshold; the others are kept and reported. Naming a block whose α is
            farther than ``threshold`` from 1 is an error unless ``force=True``.
        threshold: τ; default: the ``threshold`` of the config used at injection (0.05).
        force: Merge the named blocks even when α is far from 1 (the merged block then computes the block with
            its activation replaced by the linear target: ``W2·W1·x + b``, or with a fitted line
            ``W2·diag(a)·W1·x + b``, or the constant gate, or it is the affine target; the non-linear part is
            dropped).
        plan: A collapse plan (see above); ``blocks``, ``threshold`` and ``force`` must then be left unset.
        verify: Check every merge on a probe input before keeping it: the module holding each merged block must
            give the same output as before with the block at α = 1 (what the merge computes). An inexact merge (an
            architecture whose block this library reads wrongly) is refused with the block's name and the model is
            left as it was. Models without a ``transformers`` config (no probe input) are not checked.

    Returns:
        A :class:`~hf_layercollapse.CollapseReport` with α, parameters and FLOPs per block.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> import hf_layercollapse as hlc
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64)).eval()
        >>> model = hlc.get_collapse_model(model)
        >>> for act in hlc.injected_activations(model).values():
        ...     _ = act.alpha.data.fill_(1.0)
        >>> report = hlc.collapse_model(model)
        >>> len(report.collapsed), report.params_saved
        (2, 6272)
    """
    if plan is not None:
        if blocks is not None or threshold is not None or force:
            raise ValueError("collapse_model(plan=...) takes its blocks from the plan: leave blocks, threshold and "
                             "force unset.")
        return plan.apply(model)
    injected = injected_activations(model)
    if not injected:
        raise ValueError(
            f"{type(model).__name__} has no collapsible activations: call get_collapse_model(model, config) "
            "and fine-tune it first (or use plan_collapse for collapsing without training)."
        )
    if threshold is None:
        record = CollapseRecord.of(model)
        threshold = record.threshold if record is not None and record.threshold is not None else 0.05
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must lie in [0, 1].")
    diverged = {n: act.alpha_value for n, act in injected.items() if not math.isfinite(act.alpha_value)}
    if diverged:
        raise ValueError(f"Blocks {list(diverged)} have α = {list(diverged.values())}: training diverged, so they "
                         "are neither linear nor the original blocks. Nothing was merged; train again from a "
                         "checkpoint before the divergence (a lower learning rate or alpha_learning_rate).")
    names = list(injected)
    if blocks is not None:
        names = _resolve(blocks, names)
        far = {n: injected[n].alpha_value for n in names if abs(1 - injected[n].alpha_value) > threshold}
        if far and not force:
            details = ", ".join(f"{n} (α={a:.4f})" for n, a in far.items())
            raise ValueError(
                f"Blocks {details} have α farther than threshold={threshold} from 1: merging them would drop "
                "their non-linear part. Train longer (or raise reg_weight), or pass force=True."
            )
    units = {name: Unit(name, i, act.layout) for i, (name, act) in enumerate(injected.items())}
    merging = [n for n in names if force or abs(1.0 - injected[n].alpha_value) <= threshold]
    check_no_unmerged_adapters(model, [units[n] for n in merging])
    _check_finite(model, [(units[n], injected[n]) for n in merging])
    report = CollapseReport(model_params_before=model_params(model), threshold=threshold)
    probe = _MergeProbe(model, [(units[n], injected[n]) for n in merging]) if verify and merging else None
    for name, host in injected.items():
        report.blocks.append(_collapse_unit(model, units[name], host, name in names, threshold, force))
    if probe is not None:
        probe.verify()
    report.model_params_after = model_params(model)
    return report


class _MergeProbe:
    """The output of the module holding each unit about to merge, at α = 1, on a probe input (its inputs kept);
    :meth:`verify` replays those inputs after the merges and restores every unit when one differs."""

    def __init__(self, model: nn.Module, units: list[tuple[Unit, CollapsibleModule]]) -> None:
        self.model, self.units, self.seen = model, units, {}
        self.saved = {unit.name: {path: unit.owner(model).get_submodule(path)
                                  for path in (*unit.layout._pass_through(), unit.layout.output)}
                      for unit, _ in units}
        try:
            with torch.random.fork_rng(devices=[]):  # random pixels must not move the user's seeded stream
                inputs = dummy_inputs(model)
        except (ValueError, TypeError, AttributeError) as err:
            logger.debug("Merges not verified: no probe input (%s)", err)
            self.units = []
            return
        if "use_cache" in inspect.signature(model.forward).parameters:
            inputs["use_cache"] = False  # a replayed layer must not see the keys its first call cached
        alphas = [host.alpha.detach().clone() for _, host in units]
        hooks = [unit.owner(model).register_forward_hook(self._recorder(unit.name), with_kwargs=True)
                 for unit, _ in units]
        training = model.training
        try:
            model.eval()
            with torch.no_grad():
                for _, host in units:
                    host.alpha.fill_(1.0)
                model(**inputs)
                # the reference is the module replayed alone, as verify replays the merged one: the forward pass
                # may have run under an autocast that the model's own forward adds (Trainer's bf16 wrapper)
                self.seen = {name: (args, kwargs, self._replay(name, args, kwargs))
                             for name, (args, kwargs, _) in self.seen.items()}
                self.seen = {name: seen for name, seen in self.seen.items() if seen[2] is not None}
        except Exception as err:  # any failure of the probe forward only skips the check
            logger.warning("Merges not verified: the probe forward pass failed (%s: %s).", type(err).__name__, err)
            self.seen = {}
        finally:
            for hook in hooks:
                hook.remove()
            with torch.no_grad():
                for (_, host), alpha in zip(units, alphas):
                    host.alpha.copy_(alpha)
            model.train(training)
        missing = [unit.name for unit, _ in units if unit.name not in self.seen]
        if missing and self.seen:
            logger.warning("Merges of %s not verified: the probe forward pass does not reach them.", missing)

    def _replay(self, name: str, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
        """The outputs of unit ``name``'s module called alone on its recorded inputs (``None``: it cannot be)."""
        unit = next(u for u, _ in self.units if u.name == name)
        try:
            return _tensors(unit.owner(self.model)(*args, **kwargs))
        except Exception as err:  # a module that cannot be called again alone: no verdict
            logger.warning("Merge of %s not verified: replaying its module failed (%s: %s).", name,
                           type(err).__name__, err)
            return None

    def _recorder(self, name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if name not in self.seen:  # a module called twice (shared weights) is checked on its first call
                self.seen[name] = (_detached(args), _detached(kwargs), None)  # the output: replayed after
        return record

    def verify(self) -> None:
        training = self.model.training
        self.model.eval()
        wrong = []
        try:
            with torch.no_grad():
                for unit, _ in self.units:
                    if unit.name not in self.seen:
                        continue
                    args, kwargs, expected = self.seen[unit.name]
                    found = self._replay(unit.name, args, kwargs)
                    if found is None:
                        continue
                    error = _mismatch(expected, found)
                    if error is not None:
                        wrong.append(f"{unit.name!r} ({error})")
        finally:
            self.model.train(training)
        if wrong:
            for unit, _ in self.units:
                for path, module in self.saved[unit.name].items():
                    set_module(unit.owner(self.model), path, module)
            raise ValueError(
                f"Merging changed the output of blocks {', '.join(wrong)} beyond rounding: this library reads their "
                "structure wrongly (e.g. a fused projection split in another order). Nothing was merged. Leave them "
                "out (collapse_model(model, blocks=[...]) with the others, or exclude_modules at injection) and report "
                "the architecture at https://github.com/hf-layercollapse/hf-layercollapse/issues."
            )


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value) if not hasattr(value, "_fields") else value
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach().clone()]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _mismatch(expected: list[torch.Tensor], found: list[torch.Tensor]) -> str | None:
    """A description of the largest difference beyond rounding of the tensors' dtype, else None."""
    if len(expected) != len(found):
        return f"{len(found)} outputs instead of {len(expected)}"
    for a, b in zip(expected, found):
        if not a.is_floating_point() or a.numel() == 0:
            continue
        if a.shape != b.shape:
            return f"shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        relative, absolute = (1e-4, 1e-7) if a.dtype in (torch.float32, torch.float64) else (3e-2, 1e-3)
        scale = float(a.abs().max())
        error = float((a.float() - b.float()).abs().max())
        if not error <= relative * scale + absolute:  # NaN fails too
            return f"max |difference| {error:.3g} for outputs of magnitude {scale:.3g}"
    return None


def _check_finite(model: nn.Module, units: list[tuple[Unit, CollapsibleModule]]) -> None:
    """Refuse to merge a unit whose weights or target hold NaN or infinite values (a diverged run): the merged
    projection would be garbage that loads without complaint."""
    for unit, host in units:
        owner = unit.owner(model)
        tensors = {f"{part}.{name}": t for part in (*unit.layout.inputs, unit.layout.output)
                   for name, t in owner.get_submodule(part).named_parameters(recurse=False)}
        tensors.update({f"{unit.layout.act}.{k}": v for k, v in host.target_tensors().items()})
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"Block {unit.name!r} has NaN or infinite values in {bad}: training diverged. Nothing was "
                             "merged; train again from a checkpoint before the divergence.")


def _resolve(blocks: list[str], names: list[str]) -> list[str]:
    resolved = []
    for wanted in blocks:
        matches = [n for n in names if n == wanted or n.endswith("." + wanted)]
        if len(matches) != 1:
            problem = "matches no injected block" if not matches else f"is ambiguous ({matches})"
            raise ValueError(f"Block {wanted!r} {problem}; injected blocks are {names}.")
        resolved.append(matches[0])
    return resolved


def _collapse_unit(model: nn.Module, unit: Unit, host: CollapsibleModule, selected: bool, threshold: float,
                   force: bool) -> BlockReport:
    owner = unit.owner(model)
    costs = unit_costs(owner, unit.layout, host)
    alpha = host.alpha_value
    row = BlockReport(unit.name, unit.kind.value, alpha, "kept", "", costs.params_before, costs.params_before,
                      costs.flops_before, costs.flops_before)
    if not selected:
        row.reason = "not selected"
    elif abs(1.0 - alpha) > threshold and not force:
        row.reason = f"|1-α| = {abs(1 - alpha):.4f} > {threshold}"
    elif costs.params_after >= costs.params_before:
        row.status, row.reason = "skipped", "merging would not save parameters"
    else:
        merged = host.target.merge(unit.layout, owner, host.target_tensors())
        install_merge(model, unit, merged, alpha=alpha)
        row.status, row.params_after, row.flops_after = "collapsed", costs.params_after, costs.flops_after
    return row
