"""The measured search: every candidate merge of every MLP block measured with the real objective on held-out
calibration batches (small models, and the trainer's planned order)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import nn
from tqdm.auto import tqdm

from ..calibration import collect_statistics, statistics_passes
from ..modules import linear_weight
from ..statistics import Request, Statistics
from ..targets import LinearTarget, planner_candidates
from ..units import Layout, Unit, find_mlp_blocks, replaced_units
from .budget import Budget
from .objective import Objective
from .plan import CollapsePlan, PlannedBlock, fingerprint, replacement, simple_method

logger = logging.getLogger(__name__)


def _by_method(layout: Layout, ridge: float) -> dict[str, LinearTarget]:
    """The planner's candidate merges of a unit (targets), by method name, the simple merge first."""
    return {t.method: t for t in planner_candidates(layout, ridge)}


@dataclass(frozen=True)
class MeasuredSearch:
    """Measure every candidate merge of every MLP block alone with the real objective on the held-out batches, keep
    each block's cheapest (never worse than the simplest), pick blocks cheapest first for the budget, and measure the
    chosen set. Exact but slow on large models (one evaluation per candidate); the default for MLP blocks alone.

    Args:
        ridge: Ridge term of the least-squares fits, relative to the mean input energy.
    """

    ridge: float = 1e-4

    def plan(self, model: nn.Module, fit_batches: list[dict], eval_batches: list[dict], budget: Budget,
             units: tuple[str, ...], show_progress: bool) -> CollapsePlan:
        if set(units) != {"mlp"}:
            raise ValueError(f"MeasuredSearch plans MLP blocks only, not {list(units)}: use OnePassSearch (the "
                             "default for units beyond 'mlp').")
        blocks = find_mlp_blocks(model)
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no MLP block that can be collapsed.")
        targets = {u: _by_method(u.layout, self.ridge) for u in blocks}
        requests = {u: [r for t in targets[u].values() for r in t.requests(u.layout)] for u in blocks}
        groups = statistics_passes(model, requests)
        merges = sum(len(t) for t in targets.values())  # candidates measured per unit
        steps = len(fit_batches) * len(groups) + len(eval_batches) * (1 + merges)
        with tqdm(total=steps, desc="plan_collapse", disable=not show_progress) as progress:
            objective = Objective(model, eval_batches)
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
        selected, measured = _select(model, blocks, ranked, objective, baseline, params_total, budget)
        for planned in selected:
            planned.fingerprint = fingerprint(model, planned.unit)
        return CollapsePlan(selected, candidates, objective.kind, baseline, measured, params_total)


def _measure(model, unit: Unit, targets: dict[str, LinearTarget], stats: dict[Request, Statistics],
             objective: Objective, baseline: float, progress) -> PlannedBlock:
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
    simple = simple_method(unit.kind)
    method = min(costs, key=lambda m: (costs[m], m != simple))
    chosen = merges[method]
    before, after, _, _ = unit.layout.costs(owner, chosen.bias is not None)
    weight = bias = None
    if method != "exact":
        weight = linear_weight(chosen).detach().float().cpu().contiguous()
        bias = chosen.bias.detach().float().cpu() if chosen.bias is not None else None
    return PlannedBlock(unit.name, unit.layout, method, costs, before - after, weight, bias)


def _select(model, units, ranked, objective, baseline, params_total, budget: Budget) -> tuple[list[PlannedBlock],
                                                                                              float]:
    by_name = {u.name: u for u in units}

    def measure(chosen: list[PlannedBlock]) -> float:
        replacements = {by_name[c.name]: replacement(model, c) for c in chosen}
        with replaced_units(model, replacements):
            return objective() - baseline

    if budget.num_blocks is not None:
        if not 0 < budget.num_blocks <= len(ranked):
            raise ValueError(f"num_blocks={budget.num_blocks}: between 1 and {len(ranked)} blocks can be collapsed.")
        chosen = ranked[:budget.num_blocks]
        return chosen, measure(chosen)
    if budget.params is not None:
        saved, chosen = 0, []
        for candidate in ranked:
            chosen.append(candidate)
            saved += candidate.params_saved
            if saved >= budget.params:
                return chosen, measure(chosen)
        raise ValueError(f"{budget} cannot be met: collapsing every MLP block removes {saved / params_total:.4f} of "
                         f"the parameters at most ({saved:,}).")
    chosen, cost = [], 0.0
    for candidate in ranked:
        trial = measure([*chosen, candidate])
        if trial > budget.max_loss_increase:
            break
        chosen, cost = [*chosen, candidate], trial
    if not chosen:
        raise ValueError(f"max_loss_increase={budget.max_loss_increase} cannot be met: the cheapest block alone costs "
                         f"{ranked[0].cost:+.4g}.")
    return chosen, cost


