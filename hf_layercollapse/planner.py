"""`plan_collapse`: compression without fine-tuning, chosen and merged on calibration data.

For every MLP block the planner fits, on part of the calibration data, the best affine map from the block's
input to its output (least squares, fp64, small ridge; once with every token weighing the same and once with
each token's error relative to the size of its output) and measures on the rest how much the model's objective
grows when that block alone is replaced by either or by the simple merge: the exact linearisation ``W2·W1`` of a
plain block (the activation made the identity), or, for a gated block, the gate fixed at a constant ``c``
(``W_down·diag(c)·W_up``), both its per-channel calibration mean and the ``c`` fitted to the block's output
(relative least squares). Each block keeps its cheapest candidate (never a merge worse than the simplest one):
on the real SmolLM2-135M the plain least-squares map was measured to be catastrophic on some blocks (a few
tokens with huge activations dominate its squared error) and the mean gate on others. Blocks are then picked
cheapest first until the budget is met, and the combined cost of the chosen set is measured.
:func:`~hf_layercollapse.collapse_model` applies the plan.

The objective is the task loss when the batches carry ``labels``, the language-modelling loss for causal LMs,
and otherwise the divergence from the original outputs (KL for logits, relative squared error for hidden
states).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .calibration import calibration_batches, collect_statistics, statistics_passes
from .checkpoint import to_base_name
from .collapse import check_no_unmerged_adapters, in_model_order, install_merge, model_params, unselected_rows
from .errors import LayerCollapseConfigError
from .modules import PROJECTIONS, linear_weight
from .report import BlockReport, CollapseReport
from .statistics import Request, Statistics
from .targets import Affine, Identity, LinearTarget, planner_candidates
from .units import BlockKind, Layout, Unit, check_not_moe, find_mlp_blocks, replaced_units

logger = logging.getLogger(__name__)

PLAN_FILE, WEIGHTS_FILE = "collapse_plan.json", "collapse_plan.safetensors"
METHODS = ("exact", "constant_gate", "fitted_gate", "least_squares", "relative_least_squares")


def _simple_method(kind: BlockKind) -> str:
    """The merge every block has: ``W2·W1`` (plain) or the gate at its calibration mean (gated)."""
    return "constant_gate" if kind is BlockKind.GATED else "exact"


def _by_method(layout: Layout, ridge: float) -> dict[str, LinearTarget]:
    """The planner's candidate merges of a unit (targets), by method name, the simple merge first."""
    return {t.method: t for t in planner_candidates(layout, ridge)}


def _costs(row: dict) -> dict[str, float]:
    """A saved candidate's costs (plans written before ``costs`` existed kept two of them)."""
    if "costs" in row:
        return dict(row["costs"])
    simple = _simple_method(BlockKind(row["layout"]["kind"]))
    return {simple: row["cost_exact"], "least_squares": row["cost_least_squares"]}


@dataclass
class PlannedBlock:
    """One candidate block: its measured costs and the merge the planner chose for it."""

    name: str
    layout: Layout
    # one of METHODS: "exact" (plain: W2·W1), "constant_gate" (gated: the gate at its calibration mean),
    # "fitted_gate" (gated: the constant gate fitted to the block's output), "least_squares" (the affine map fitted
    # to the block's output) or "relative_least_squares" (the same, each token's error relative to its output's size)
    method: str
    costs: dict[str, float]  # every candidate's measured cost, by method
    params_saved: int
    weight: torch.Tensor | None = field(default=None, repr=False)  # the chosen map [out, in] (not for "exact")
    bias: torch.Tensor | None = field(default=None, repr=False)

    @property
    def cost(self) -> float:
        """Cost of the chosen merge."""
        return self.costs[self.method]

    @property
    def cost_exact(self) -> float:
        """Cost of the simple merge: ``W2·W1`` (plain) or the gate at its calibration mean (gated)."""
        return self.costs[_simple_method(self.layout.kind)]

    @property
    def cost_least_squares(self) -> float:
        return self.costs["least_squares"]


@dataclass
class CollapsePlan:
    """What :func:`plan_collapse` measured and chose; print it, save it, or pass it to ``collapse_model``."""

    selected: list[PlannedBlock]
    candidates: list[PlannedBlock]
    objective: str
    baseline: float
    measured_cost: float
    params_total: int

    @property
    def params_saved(self) -> int:
        return sum(b.params_saved for b in self.selected)

    def to_dict(self) -> dict:
        def row(b: PlannedBlock) -> dict:
            return {"name": b.name, "layout": b.layout.to_dict(), "method": b.method, "cost": b.cost,
                    "costs": b.costs, "params_saved": b.params_saved}

        return {"objective": self.objective, "baseline": self.baseline, "measured_cost": self.measured_cost,
                "params_total": self.params_total, "params_saved": self.params_saved,
                "selected": [b.name for b in self.selected], "candidates": [row(b) for b in self.candidates]}

    def __str__(self) -> str:
        chosen = {b.name for b in self.selected}
        methods = [m for m in METHODS if any(m in b.costs for b in self.candidates)]
        rows = [("block", "chosen", "merge", *(f"cost ({m})" for m in methods), "params saved")]
        for b in self.candidates:
            costs = [f"{b.costs[m]:+.4g}" if m in b.costs else "" for m in methods]
            rows.append((b.name, "yes" if b.name in chosen else "", b.method, *costs, f"{b.params_saved:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        fraction = 100 * self.params_saved / self.params_total if self.params_total else 0.0
        lines.append(f"{self.objective}: baseline {self.baseline:.4g}; {len(self.selected)} blocks chosen, measured "
                     f"increase {self.measured_cost:+.4g} (sum of single-block costs "
                     f"{sum(b.cost for b in self.selected):+.4g}); parameters saved {self.params_saved:,} "
                     f"({fraction:.2f}%)")
        return "\n".join(lines)

    def apply(self, model: nn.Module) -> CollapseReport:
        """Merge the plan's blocks into ``model`` in place, each with the merge the planner chose (what
        ``collapse_model(model, plan=plan)`` does); everything is checked before anything changes."""
        return apply_collapse_plan(model, self)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``collapse_plan.json`` and the fitted maps (``collapse_plan.safetensors``) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{b.name}.{k}": v.contiguous() for b in self.candidates
                   for k, v in (("weight", b.weight), ("bias", b.bias)) if v is not None}
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, directory / WEIGHTS_FILE)
        tmp = directory / (PLAN_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, directory / PLAN_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CollapsePlan:
        directory = Path(directory)
        try:
            data = json.loads((directory / PLAN_FILE).read_text())
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, json.JSONDecodeError, SafetensorError) as err:
            raise ValueError(f"{directory} does not hold a readable collapse plan ({PLAN_FILE}, {WEIGHTS_FILE}): "
                             f"{err}") from err
        try:
            candidates = [PlannedBlock(c["name"], Layout.from_dict(c["layout"], f"the layout of {c['name']!r}"),
                                       c["method"], _costs(c), c["params_saved"], tensors.get(f"{c['name']}.weight"),
                                       tensors.get(f"{c['name']}.bias")) for c in data["candidates"]]
            by_name = {b.name: b for b in candidates}
            return cls([by_name[n] for n in data["selected"]], candidates, data["objective"], data["baseline"],
                       data["measured_cost"], data["params_total"])
        except LayerCollapseConfigError as err:
            raise LayerCollapseConfigError(f"{directory / PLAN_FILE}: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{directory / PLAN_FILE} is not a collapse plan written by CollapsePlan.save (missing "
                             f"or wrong entry {err}): write it again with plan_collapse(...).save().") from None


# --------------------------------------------------------------------------------------------------- objective
class _Objective:
    """Mean loss over batches: task loss, LM loss, or divergence from the original outputs."""

    def __init__(self, model: nn.Module, batches: list[dict]) -> None:
        self.model = model
        self.batches = batches
        name = getattr(model, "_get_name", lambda: "")()
        if all("labels" in b for b in batches):
            self.kind = "task loss"
        elif name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() and all("input_ids" in b for b in batches):
            self.kind = "language-modelling loss"
            for b in batches:
                labels = b["input_ids"].clone()
                if "attention_mask" in b:
                    labels[b["attention_mask"] == 0] = -100
                b["labels"] = labels
        else:
            self.kind = "output divergence"
            self.reference = [self._output(b) for b in batches]

    @torch.no_grad()
    def _output(self, batch: dict) -> torch.Tensor:
        out = self.model(**{k: v for k, v in batch.items() if k != "labels"})
        first = out["logits"] if "logits" in out else out[0]
        return first.float()

    @torch.no_grad()
    def __call__(self, progress=None) -> float:
        total, weight = 0.0, 0
        for i, batch in enumerate(self.batches):
            n = next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).shape[0]
            if self.kind != "output divergence":
                value = float(self.model(**batch).loss)
            else:
                out, ref = self._output(batch), self.reference[i]
                if out.shape[-1] <= 1024 and out.dim() == 2:  # classification logits: KL(original || merged)
                    value = float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1),
                                                             log_target=True, reduction="batchmean"))
                else:
                    value = float((out - ref).square().sum() / ref.square().sum().clamp(min=1e-12))
            total, weight = total + value * n, weight + n
            if progress is not None:
                progress.update(1)
        return total / weight


def plan_collapse(
    model: nn.Module,
    calibration_data,
    *,
    num_blocks: int | None = None,
    params_fraction: float | None = None,
    max_loss_increase: float | None = None,
    batch_size: int = 8,
    holdout: float = 0.5,
    ridge: float = 1e-4,
    show_progress: bool = True,
) -> CollapsePlan:
    """Measure what linearising each MLP block costs on calibration data and pick blocks for a budget.

    Give exactly one budget: ``num_blocks`` (the k cheapest blocks), ``params_fraction`` (remove at least this
    fraction of the model's parameters) or ``max_loss_increase`` (add blocks cheapest first while the measured
    increase of the objective stays within it).

    Args:
        model: Any model the core supports (plain MLP blocks; injected or not).
        calibration_data: A ``datasets.Dataset`` of model inputs (fixed length), a ``DataLoader`` or batches.
        batch_size: Batch size when ``calibration_data`` is a dataset.
        holdout: Fraction of the batches used to measure costs; the rest fits the least-squares maps.
        ridge: Ridge term of the least-squares fit, relative to the mean input energy.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> import hf_layercollapse as hlc
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        ...                              intermediate_size=64, vocab_size=50)).eval()
        >>> batches = [{"input_ids": torch.randint(1, 50, (4, 12))} for _ in range(4)]
        >>> plan = hlc.plan_collapse(model, batches, num_blocks=2, show_progress=False)
        >>> len(plan.selected), len(hlc.collapse_model(model, plan=plan).collapsed)
        (2, 2)
    """
    budgets = [b for b in (num_blocks, params_fraction, max_loss_increase) if b is not None]
    if len(budgets) != 1:
        raise ValueError("Give exactly one budget: num_blocks, params_fraction or max_loss_increase.")
    if params_fraction is not None and not 0 < params_fraction < 1:
        raise ValueError(f"params_fraction={params_fraction!r} must lie in (0, 1).")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout={holdout!r} must lie in (0, 1).")
    batches = calibration_batches(calibration_data, model, batch_size)
    labelled = sum("labels" in b for b in batches)
    if 0 < labelled < len(batches):
        raise ValueError(f"{labelled} of the {len(batches)} calibration batches have labels: give labels in every "
                         "batch (the task loss is measured) or in none (the language-modelling loss, or the change "
                         "of the outputs).")
    split = max(1, min(len(batches) - 1, round(len(batches) * (1 - holdout)))) if len(batches) > 1 else 1
    fit_batches, eval_batches = batches[:split], (batches[split:] or batches)
    if len(batches) == 1:
        logger.warning("plan_collapse: one calibration batch, so the maps are fitted and their costs measured on the "
                       "same data, which makes the costs look smaller than they are: give at least 2 batches.")
    check_not_moe(model)
    units = find_mlp_blocks(model)
    if not units:
        raise ValueError(f"{type(model).__name__} has no MLP block that can be collapsed.")
    was_training = model.training
    model.eval()
    try:
        targets = {u: _by_method(u.layout, ridge) for u in units}
        requests = {u: [r for t in targets[u].values() for r in t.requests(u.layout)] for u in units}
        groups = statistics_passes(model, requests)
        merges = sum(len(t) for t in targets.values())  # candidates measured per unit
        steps = len(fit_batches) * len(groups) + len(eval_batches) * (1 + merges)
        with tqdm(total=steps, desc="plan_collapse", disable=not show_progress) as progress:
            objective = _Objective(model, eval_batches)
            baseline = objective(progress)
            candidates = []
            for group in groups:  # each group's sums are dropped once its units are measured: bounded memory
                stats = collect_statistics(model, {u: requests[u] for u in group}, fit_batches, progress)
                candidates += [_measure(model, unit, targets[unit], stats.pop(unit.name), objective, baseline,
                                        progress) for unit in group]
        candidates = [c for c in candidates if c.params_saved > 0]
        if not candidates:
            raise ValueError(f"No MLP block of {type(model).__name__} saves parameters when merged (each block's "
                             "d_out × d_in map is at least as large as its two projections): there is nothing to "
                             "plan.")
        ranked = sorted(candidates, key=lambda c: c.cost)
        params_total = sum(p.numel() for p in model.parameters())
        selected, measured = _select(model, units, ranked, objective, baseline, params_total, num_blocks,
                                     params_fraction, max_loss_increase)
    finally:
        model.train(was_training)
    return CollapsePlan(selected, candidates, objective.kind, baseline, measured, params_total)


def _measure(model, unit: Unit, targets: dict[str, LinearTarget], stats: dict[Request, Statistics],
             objective: _Objective, baseline: float, progress) -> PlannedBlock:
    """Cost of each candidate merge of the unit (:func:`~hf_layercollapse.targets.planner_candidates`), measured
    alone on the held-out batches; keeps the cheapest (ties go to the simple merge)."""
    owner = unit.owner(model)
    merges = {method: target.merge(unit.layout, owner, target.solve(unit.layout, owner, stats))
              for method, target in targets.items()}
    costs = {}
    for method, merged in merges.items():
        with replaced_units(model, {unit: merged}):
            cost = objective(progress) - baseline
        costs[method] = cost if math.isfinite(cost) else math.inf
    simple = _simple_method(unit.kind)
    method = min(costs, key=lambda m: (costs[m], m != simple))
    chosen = merges[method]
    before, after, _, _ = unit.layout.costs(owner, chosen.bias is not None)
    weight = bias = None
    if method != "exact":
        weight = linear_weight(chosen).detach().float().cpu().contiguous()
        bias = chosen.bias.detach().float().cpu() if chosen.bias is not None else None
    return PlannedBlock(unit.name, unit.layout, method, costs, before - after, weight, bias)


def _replacement(model, planned: PlannedBlock) -> nn.Module:
    owner = model.get_submodule(planned.name) if planned.name else model
    if planned.method == "exact":
        return Identity().merge(planned.layout, owner, {})
    if planned.weight is None:
        raise ValueError(f"The plan has no fitted map for block {planned.name!r} ({planned.method}).")
    try:
        return Affine().merge(planned.layout, owner, {"affine_weight": planned.weight, "affine_bias": planned.bias})
    except ValueError as err:
        raise ValueError(f"The plan's map for {planned.name!r}: {err} The plan belongs to another model.") from None


def _select(model, units, ranked, objective, baseline, params_total, num_blocks, params_fraction,
            max_loss_increase) -> tuple[list[PlannedBlock], float]:
    by_name = {u.name: u for u in units}

    def measure(chosen: list[PlannedBlock]) -> float:
        replacements = {by_name[c.name]: _replacement(model, c) for c in chosen}
        with replaced_units(model, replacements):
            return objective() - baseline

    if num_blocks is not None:
        if not 0 < num_blocks <= len(ranked):
            raise ValueError(f"num_blocks={num_blocks}: between 1 and {len(ranked)} blocks can be collapsed.")
        chosen = ranked[:num_blocks]
        return chosen, measure(chosen)
    if params_fraction is not None:
        saved, chosen = 0, []
        for candidate in ranked:
            chosen.append(candidate)
            saved += candidate.params_saved
            if saved >= params_fraction * params_total:
                return chosen, measure(chosen)
        best = saved / params_total
        raise ValueError(f"params_fraction={params_fraction} cannot be met: collapsing every block removes "
                         f"{best:.4f} of the parameters at most.")
    chosen, cost = [], 0.0
    for candidate in ranked:
        trial = measure([*chosen, candidate])
        if trial > max_loss_increase:
            break
        chosen, cost = [*chosen, candidate], trial
    if not chosen:
        raise ValueError(f"max_loss_increase={max_loss_increase} cannot be met: the cheapest block alone costs "
                         f"{ranked[0].cost:+.4g}.")
    return chosen, cost


def _check_applicable(model: nn.Module, plan: CollapsePlan) -> None:
    """The plan's units are in ``model``, not wrapped by unmerged adapters, not merged yet, and recordable."""
    for planned in plan.selected:
        try:
            owner = model.get_submodule(planned.name) if planned.name else model
            for part in planned.layout.parts:
                owner.get_submodule(part)
        except AttributeError:
            raise ValueError(f"The plan's block {planned.name!r} ({' → '.join(planned.layout.parts)}) is not in this "
                             f"{type(model).__name__}: the plan belongs to another model.") from None
    check_no_unmerged_adapters(model, [Unit(p.name, 0, p.layout) for p in plan.selected])
    for planned in plan.selected:
        owner = model.get_submodule(planned.name) if planned.name else model
        if not isinstance(owner.get_submodule(planned.layout.inputs[0]), PROJECTIONS):
            raise ValueError(f"The plan's block {planned.name!r} is collapsed already: apply a plan once, to the model "
                             "it was made for.")
        if isinstance(model, PreTrainedModel):  # records are kept for transformers models only
            to_base_name(model, planned.name)


def apply_collapse_plan(model: nn.Module, plan: CollapsePlan) -> CollapseReport:
    """Merge the plan's units in place (:meth:`CollapsePlan.apply`)."""
    report = CollapseReport(model_params_before=model_params(model))
    _check_applicable(model, plan)  # everything is validated before anything changes
    replacements = [(p, _replacement(model, p)) for p in plan.selected]
    chosen = {p.name for p in plan.selected}
    left = [Unit(c.name, 0, c.layout) for c in plan.candidates if c.name not in chosen]
    report.blocks += unselected_rows(model, left)  # the units the plan leaves (candidates save parameters)
    for planned, merged in replacements:
        unit = Unit(planned.name, 0, planned.layout)
        owner = unit.owner(model)
        before, after, flops_before, flops_after = planned.layout.costs(owner, merged.bias is not None)
        alpha = getattr(owner.get_submodule(planned.layout.act), "alpha_value", None)
        install_merge(model, unit, merged, alpha=alpha, method=planned.method)
        report.blocks.append(BlockReport(planned.name, planned.layout.kind.value, alpha, "collapsed",
                                         planned.method, before, after, flops_before, flops_after))
    report.blocks = in_model_order(model, report.blocks)
    report.model_params_after = model_params(model)
    return report
