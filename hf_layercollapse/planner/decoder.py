"""The one-pass search for decoder LLMs: MLP blocks, single decoder layers and spans of layers, in one calibration pass.

Every unit of a decoder adds to the residual stream, so replacing it by a linear map perturbs the hidden state: an
MLP block ``j`` by ``ŷ − M_j`` (its output against the map's), a span ``s … s+n−1`` by ``h_{s−1}' + M_{s−1}·T −
h_{s+n}`` (ReplaceMe's construction, see :mod:`hf_layercollapse.units.decoder`; ``T = I`` is a plain cut). One pass
over the calibration batches accumulates, for every candidate at once, the fp64 normal equations of its map with each
token weighted by ``1/‖h‖²`` of the residual stream entering the unit (:class:`~hf_layercollapse.statistics.
ResidualFitStats`; memory does not grow with the tokens), separately for the fitting and the held-out batches. The
held-out sums then give, in closed form, the error of any map: each unit's ridge is chosen on them (pulling the map
towards the simple one: ``W2·W1`` or the mean gate, the cut), and each unit's cost is its held-out relative
perturbation — one scale for every kind, so units are ranked cheaply across kinds. A few selections for the budget
(each kind alone, the best single span; then every kind together, each kind's proxy scaled by what its own
selection measured) are then measured exactly with the real objective, and the best is kept; never a map worse than
the simple one. Last, the layer before each chosen span may get its MLP output projection fitted anew (a second pass,
for those layers only), kept where the objective improves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import STATISTICS_MEMORY
from ..merging import merge_gated
from ..modules import as_linear, projection_from
from ..statistics import ResidualFitStats
from ..targets import Identity
from ..units import DecoderStack, GatedLayout, SpanLayout, Unit, decoder_stack, find_mlp_blocks, replaced_units
from .budget import Budget
from .objective import Objective
from .plan import CollapsePlan, PlannedBlock, fingerprint

KINDS = ("mlp", "layer", "span")


@dataclass
class _Candidate:
    """A unit with its best map and its held-out cost (relative perturbation of the residual stream)."""

    unit: Unit
    kind: str  # "mlp", "layer" or "span"
    method: str
    costs: dict[str, float]
    params_saved: int
    solution: torch.Tensor | None  # MLP: [d_in + 1, d_out] (bias row last); span: T [d, d]; None: the simple merge
    quality: dict[str, float] = field(default_factory=dict)
    gate_mean: torch.Tensor | None = None  # a gated block's simple merge: the gate at its calibration mean
    weight: torch.Tensor | None = None  # a refitted span: the new weight of the output projection before it

    @property
    def fused(self) -> bool:
        return self.solution is not None or self.weight is not None

    @property
    def cost(self) -> float:
        return self.costs[self.method]

    def layers(self) -> set[int]:
        """The decoder layers the unit removes (spans) or changes (MLP blocks: their own layer)."""
        if isinstance(self.unit.layout, SpanLayout):
            return set(range(self.unit.layout.start, self.unit.layout.end))
        return {self.unit.index}

    def fuses_into(self) -> int | None:
        """The layer whose output projection takes the unit's map (a fused span), else None."""
        return self.unit.layout.start - 1 if isinstance(self.unit.layout, SpanLayout) and self.fused else None


def _compatible(a: _Candidate, b: _Candidate) -> bool:
    """Two units can be applied together: no layer in common, and no span fusing into (or needing) a layer the other
    removes or merges."""
    if a.layers() & b.layers():
        return False
    for x, y in ((a, b), (b, a)):
        if x.fuses_into() is not None and (x.fuses_into() in y.layers()):
            return False
    return True


@dataclass(frozen=True)
class OnePassSearch:
    """Plan MLP blocks, decoder layers and spans of a decoder LLM from one calibration pass (see the module
    docstring), then measure a few selections with the real objective.

    Args:
        ridges: Ridge strengths tried for every unit (relative to its mean input energy; towards the simple map),
            the one with the lowest held-out error kept.
        max_span: The longest span considered (default: as many layers as the budget could remove, plus one).
        verify: At most how many selections are measured with the real objective: each kind alone (the measured
            costs calibrate each kind's proxy), the cheapest single span, every kind together with the calibrated
            proxies.
        verify_batches: Held-out batches each measurement uses (default: all of them).
        refit: After choosing, fit the output projection of the layer before each chosen span anew from its own
            inputs (a second pass over the calibration data for those layers only), keep it where the real
            objective improves.
        memory: Bytes of fp64 sums gathered in one pass; beyond, the spans' sums take more passes.
    """

    ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    max_span: int | None = None
    verify: int = 5
    verify_batches: int | None = 2
    refit: bool = True
    memory: int = STATISTICS_MEMORY

    def plan(self, model: nn.Module, fit_batches: list[dict], eval_batches: list[dict], budget: Budget,
             units: tuple[str, ...], show_progress: bool) -> CollapsePlan:
        unknown = sorted(set(units) - set(KINDS))
        if unknown or not units:
            raise ValueError(f"units={list(units)}: choose among {list(KINDS)}.")
        if budget.params is None:
            raise ValueError(f"The one-pass search takes a budget in parameters (params_fraction= or num_params=), not "
                             f"{budget}.")
        if self.verify < 1:
            raise ValueError(f"verify={self.verify}: at least one selection must be measured.")
        mlps = find_mlp_blocks(model)
        stack = decoder_stack(model, mlps)
        layers = stack.layers(model)
        layer_params = sum(p.numel() for p in layers[len(layers) // 2].parameters())
        longest = self.max_span or min(len(stack) - 1, math.ceil(budget.params / max(layer_params, 1)) + 1)
        lengths = [n for n in range(1, longest + 1) if (n == 1 and "layer" in units) or (n > 1 and "span" in units)]
        objective = Objective(model, eval_batches)
        verifier = objective if self.verify_batches is None else Objective(model, eval_batches[: self.verify_batches])
        passes = _passes(stack, model, lengths, self.memory)
        steps = ((len(fit_batches) + len(eval_batches)) * (len(passes) + int(self.refit))
                 + len(verifier.batches) * (self.verify + 2 * int(self.refit)))
        with tqdm(total=steps, desc="plan_collapse (one pass)", disable=not show_progress) as progress:
            stats = _Statistics(stack, "mlp" in units, lengths)
            baseline = None
            for index, starts in enumerate(passes):
                losses = stats.collect(model, fit_batches, eval_batches, starts, with_mlps=index == 0,
                                       progress=progress)
                baseline = losses if baseline is None else baseline
            if not math.isfinite(baseline):  # an objective the model's loss does not give (output divergence)
                baseline = objective(progress)
            candidates = [*self._mlp_candidates(model, stack, stats)] if "mlp" in units else []
            candidates += self._span_candidates(model, stack, stats, lengths)
            reference = baseline if verifier is objective else verifier(progress)
            measured, selections = {}, {}

            def measure(description: str, chosen: list[_Candidate] | None) -> None:
                key = frozenset(id(c) for c in chosen or [])
                if chosen and len(measured) < self.verify and key not in {frozenset(map(id, v)) for v in
                                                                          selections.values()}:
                    selections[description] = chosen
                    measured[description] = _measure(model, chosen, verifier, progress) - reference

            # each kind alone, and the cheapest single span: their measured costs calibrate the kinds' proxies
            factors = {}
            for kind in units:
                chosen = _greedy([c for c in candidates if c.kind == kind], budget.params)
                measure(f"cheapest per parameter, {kind} units only", chosen)
                if chosen and f"cheapest per parameter, {kind} units only" in measured:
                    proxy = sum(c.cost for c in chosen)
                    factors[kind] = max(measured[f"cheapest per parameter, {kind} units only"], 1e-6) / max(proxy,
                                                                                                             1e-12)
            singles = [c for c in candidates if c.kind != "mlp" and c.params_saved >= budget.params]
            if singles:
                measure("the cheapest single span", [min(singles, key=lambda c: (c.cost, c.params_saved))])
            if len(factors) > 1:  # every kind together, each proxy scaled by its kind's measured factor
                measure("cheapest per parameter, every kind (proxies calibrated per kind)",
                        _greedy(candidates, budget.params, {k: factors.get(k, 1.0) for k in units}))
            if not measured:
                best = sum(c.params_saved for c in candidates)
                raise ValueError(f"{budget} cannot be met with units {list(units)}: at most {best:,} parameters can be "
                                 "removed by compatible units (allow more unit kinds, or a longer max_span).")
            description = min(measured, key=measured.get)
            chosen = selections[description]
            if self.refit and any(c.kind != "mlp" for c in chosen):
                refitted = _refit(model, stack, chosen, fit_batches, eval_batches, self.ridges, progress)
                cost = _measure(model, refitted, verifier, progress) - reference
                if cost < measured[description]:
                    measured[f"{description}, refitted"] = cost
                    selections[f"{description}, refitted"] = refitted
                    candidates = [next((r for r in refitted if r.unit == c.unit), c) for c in candidates]
                    description, chosen = f"{description}, refitted", refitted
        planned = {id(c): _planned(model, c, c in chosen) for c in candidates}
        params_total = sum(p.numel() for p in model.parameters())
        return CollapsePlan([planned[id(c)] for c in chosen], list(planned.values()), objective.kind, baseline,
                            measured[description], params_total,
                            {d: v for d, v in measured.items() if d != description})

    # ------------------------------------------------------------------------------------------ candidates
    def _best(self, fit: ResidualFitStats, held: ResidualFitStats, target: int, prior: torch.Tensor,
              everything: ResidualFitStats | None = None) -> tuple[torch.Tensor, float, float]:
        """The map with the lowest held-out error over the ridges (fitted on all tokens with that ridge), its held-out
        error, and the simple map's."""
        return _best(fit, held, target, prior, self.ridges, everything)

    def _mlp_candidates(self, model: nn.Module, stack: DecoderStack, stats: _Statistics) -> list[_Candidate]:
        found = []
        for index, unit in enumerate(stack.mlps):
            owner, layout = unit.owner(model), unit.layout
            simple_method, merged = _simple_merge(model, unit, stats.gate_means.get(index))
            weight, bias = as_linear(merged)
            bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
            prior = torch.cat([weight.T, bias[None]]).double()
            fit, held = stats.mlp[index]
            solution, error, simple = self._best(fit, held, 0, prior.to(fit.gram.device), fit.merge(held))
            costs = {simple_method: simple, "relative_least_squares": error}
            method = min(costs, key=lambda m: (costs[m], m != simple_method))
            bias_kept = method != simple_method or merged.bias is not None
            before, after, _, _ = layout.costs(owner, bias_kept)
            zero = held.energy_of(0)
            quality = {"relative_error": costs[method], "r2": 1 - costs[method] / zero if zero else 0.0}
            found.append(_Candidate(Unit(unit.name, index, layout), "mlp", method, costs, before - after,
                                    None if method == simple_method else solution, quality,
                                    stats.gate_means.get(index)))
        return [c for c in found if c.params_saved > 0]

    def _span_candidates(self, model: nn.Module, stack: DecoderStack, stats: _Statistics,
                         lengths: list[int]) -> list[_Candidate]:
        found = []
        layers = stack.layers(model)
        for start, (fit, held) in stats.spans.items():
            everything = fit.merge(held)
            for k, length in enumerate(n for n in lengths if start + n <= len(stack)):
                identity = torch.eye(fit.gram.shape[0], dtype=torch.float64, device=fit.gram.device)
                solution, error, cut = self._best(fit, held, k, identity, everything)
                costs = {"cut": cut}
                if stack.fusable:
                    costs["fused_map"] = error
                method = min(costs, key=lambda m: (costs[m], m != "cut"))
                unit = stack.span(start, length)
                zero = held.energy_of(k)
                found.append(_Candidate(unit, "layer" if length == 1 else "span", method, costs,
                                        unit.layout.costs(layers, False).params_before,
                                        solution if method == "fused_map" else None,
                                        {"relative_error": costs[method],
                                         "r2": 1 - costs[method] / zero if zero else 0.0}))
        return found


def _best(fit: ResidualFitStats, held: ResidualFitStats, target: int, prior: torch.Tensor, ridges: tuple[float, ...],
          everything: ResidualFitStats | None = None) -> tuple[torch.Tensor, float, float]:
    """The map with the lowest held-out error over ``ridges`` (refitted on every token, ``everything``, with that
    ridge), its held-out error, and the prior's."""
    errors = [held.error(target, a) for a in fit.ridge_path(target, list(ridges), prior)]
    best = min(range(len(ridges)), key=lambda i: (errors[i], -ridges[i]))
    everything = everything if everything is not None else fit.merge(held)
    return everything.ridge_path(target, [ridges[best]], prior)[0], errors[best], held.error(target, prior)


def _simple_merge(model: nn.Module, unit: Unit, gate_mean: torch.Tensor | None) -> tuple[str, nn.Module]:
    """The simple merge of an MLP block: ``W2·W1`` (plain) or the gate fixed at its calibration mean (gated)."""
    owner, layout = unit.owner(model), unit.layout
    if isinstance(layout, GatedLayout):
        return "constant_gate", merge_gated(layout.up_weight(owner), owner.get_submodule(layout.down), gate_mean)
    return "exact", Identity().merge(layout, owner, {})


def _planned(model: nn.Module, candidate: _Candidate, selected: bool) -> PlannedBlock:
    unit, layout = candidate.unit, candidate.unit.layout
    weight = bias = None
    if selected and candidate.weight is not None:  # a refitted span: the new weight of the projection before it
        weight = candidate.weight.float().cpu().contiguous()
    elif selected and candidate.solution is not None:
        solution = candidate.solution.float().cpu()
        if isinstance(layout, SpanLayout):
            weight = solution.contiguous()
        else:
            weight, bias = solution[:-1].T.contiguous(), solution[-1].contiguous()
    elif selected and candidate.method == "constant_gate":  # the mean gate: its merged projection, as a map
        weight, bias = as_linear(_merged(model, candidate))
        weight, bias = weight.float().cpu(), None if bias is None else bias.float().cpu()
    if isinstance(layout, SpanLayout):
        last = "" if layout.length == 1 else f"-{layout.end - 1}"
        name, owner = f"{unit.name}.{layout.start}{last}", unit.name
    else:
        name, owner = unit.name, None
    block = PlannedBlock(name, layout, candidate.method, candidate.costs, candidate.params_saved, weight, bias, owner,
                         candidate.quality)
    if selected:
        block.fingerprint = fingerprint(model, block.unit)
    return block


def _greedy(pool: list[_Candidate], params: int, factors: dict[str, float] | None = None) -> list[_Candidate] | None:
    """Compatible units, cheapest (proxy cost, scaled by its kind's factor) per parameter saved first, until they
    remove ``params`` parameters; ``None`` when they cannot."""
    factors = factors or {}
    chosen, saved = [], 0
    for c in sorted(pool, key=lambda c: (factors.get(c.kind, 1.0) * c.cost / c.params_saved, c.cost)):
        if all(_compatible(c, other) for other in chosen):
            chosen.append(c)
            saved += c.params_saved
            if saved >= params:
                return chosen
    return None


@torch.no_grad()
def _measure(model: nn.Module, chosen: list[_Candidate], objective: Objective, progress) -> float:
    """The objective with the chosen units replaced (hooks; the model is unchanged)."""
    handles, merged = [], {}
    for candidate in chosen:
        unit, layout = candidate.unit, candidate.unit.layout
        owner = unit.owner(model)
        if isinstance(layout, SpanLayout):
            if candidate.weight is not None:
                w = candidate.weight.float()
                handles.append(owner.get_submodule(layout.inputs[0]).register_forward_hook(
                    lambda m, args, out, w=w: torch.nn.functional.linear(args[0].float(), w.to(out.device)).to(
                        out.dtype)))
            elif candidate.solution is not None:
                t = candidate.solution.float()
                handles.append(owner.get_submodule(layout.inputs[0]).register_forward_hook(
                    lambda m, args, out, t=t: (out.float() @ t.to(out.device)).to(out.dtype)))
            for index in range(layout.start, layout.end):
                handles.append(owner[index].register_forward_hook(_skip_layer, with_kwargs=True))
        else:
            merged[unit] = _merged(model, candidate)
    try:
        with replaced_units(model, merged):
            return objective(progress)
    finally:
        for handle in handles:
            handle.remove()


def _skip_layer(module: nn.Module, args: tuple, kwargs: dict, output):
    """A forward hook that makes a decoder layer the identity on its hidden states."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _merged(model: nn.Module, candidate: _Candidate) -> nn.Module:
    unit = candidate.unit
    owner = unit.owner(model)
    if candidate.solution is None:
        return _simple_merge(model, unit, candidate.gate_mean)[1]
    solution = candidate.solution
    output = owner.get_submodule(unit.layout.output)
    return projection_from(output, solution[:-1].T, solution[-1])


@torch.no_grad()
def _refit(model: nn.Module, stack: DecoderStack, chosen: list[_Candidate], fit_batches: list[dict],
           eval_batches: list[dict], ridges: tuple[float, ...], progress) -> list[_Candidate]:
    """The chosen selection with each span's layer before it given a new MLP output projection ``W'``, fitted from
    that projection's own inputs ``a`` so that ``residual + a·W'ᵀ`` approximates the hidden state after the span (the
    same target as the span's map ``T``, a richer map: ``W' = Tᵀ·W`` is one of them, and the ridge pulls towards
    it). One more pass over the calibration data, with sums for the spans' layers only."""
    spans = [c for c in chosen if isinstance(c.unit.layout, SpanLayout)]
    layers = stack.layers(model)
    taps: dict[str, torch.Tensor] = {}
    handles = []
    for c in spans:
        s, e = c.unit.layout.start, c.unit.layout.end
        projection = layers[s - 1].get_submodule(stack.fuse)
        def keep_projection(module, args, out, s=s):
            taps[f"a{s}"], taps[f"m{s}"] = args[0], out

        handles.append(projection.register_forward_hook(keep_projection))
        handles.append(layers[s].register_forward_pre_hook(
            lambda m, args, kwargs, s=s: taps.__setitem__(f"h{s}", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        if e < len(layers):
            handles.append(layers[e].register_forward_pre_hook(
                lambda m, args, kwargs, s=s: taps.__setitem__(f"y{s}", args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        else:
            handles.append(layers[-1].register_forward_hook(
                lambda m, args, out, s=s: taps.__setitem__(f"y{s}", out[0] if isinstance(out, tuple) else out)))
    sums: dict[int, tuple[ResidualFitStats, ResidualFitStats]] = {}
    try:
        for held, batch in [(False, b) for b in fit_batches] + [(True, b) for b in eval_batches]:
            taps.clear()
            model(**{k: v for k, v in batch.items() if k != "labels"})
            mask = batch.get("attention_mask")
            keep = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) else None
            for c in spans:
                s = c.unit.layout.start
                a, m, h, y = (_flat(taps[f"{k}{s}"], keep) for k in "amhy")
                pair = sums.setdefault(s, tuple(ResidualFitStats(a.shape[1], m.shape[1], 1, a.device)
                                                for _ in range(2)))
                pair[int(held)].update(a, [y - h + m], 1.0 / h.pow(2).sum(1).clamp(min=1e-12))
            progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
    refitted = []
    for c in chosen:
        if not isinstance(c.unit.layout, SpanLayout):
            refitted.append(c)
            continue
        s = c.unit.layout.start
        weight = layers[s - 1].get_submodule(stack.fuse).weight.detach()
        base = weight.double().T if c.solution is None else weight.double().T @ c.solution.to(weight.device)
        fit, held = sums[s]
        solution, error, _ = _best(fit, held, 0, base.to(fit.gram.device), ridges)
        costs = {**c.costs, "refit": error}
        refitted.append(_Candidate(c.unit, c.kind, "refit", costs, c.params_saved, None,
                                   {**c.quality, "relative_error": error}, weight=solution.T.contiguous()))
    return refitted


def _flat(tensor: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    tensor = tensor.reshape(-1, tensor.shape[-1]).float()
    return tensor[keep] if keep is not None and keep.numel() == tensor.shape[0] else tensor


# ------------------------------------------------------------------------------------------------------ the pass
class _Statistics:
    """The sums of one or more passes: per MLP block and per span start, fitting and held-out."""

    def __init__(self, stack: DecoderStack, mlps: bool, lengths: list[int]) -> None:
        self.stack, self.with_mlps, self.lengths = stack, mlps, lengths
        self.mlp: dict[int, tuple[ResidualFitStats, ResidualFitStats]] = {}
        self.spans: dict[int, tuple[ResidualFitStats, ResidualFitStats]] = {}
        self.gate_means: dict[int, torch.Tensor] = {}
        self._gate_sums: dict[int, torch.Tensor] = {}
        self._gate_counts: dict[int, int] = {}

    @torch.no_grad()
    def collect(self, model: nn.Module, fit_batches: list[dict], eval_batches: list[dict], starts: list[int],
                with_mlps: bool, progress) -> float:
        """One pass over every batch, filling the sums of the MLP blocks (``with_mlps``) and of the spans starting
        at ``starts``; returns the objective on the held-out batches (their loss, as :class:`Objective` counts it)."""
        stack, layers = self.stack, self.stack.layers(model)
        taps: dict[str, torch.Tensor] = {}
        handles = []
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: taps.__setitem__(f"h{i}", args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        handles.append(layers[-1].register_forward_hook(
            lambda m, args, out: taps.__setitem__(f"h{len(layers)}", out[0] if isinstance(out, tuple) else out)))
        for i, unit in enumerate(stack.mlps):
            mlp = unit.owner(model)
            handles.append(mlp.register_forward_pre_hook(lambda m, args, i=i: taps.__setitem__(f"x{i}", args[0])))
            handles.append(mlp.register_forward_hook(lambda m, args, out, i=i: taps.__setitem__(f"m{i}", out)))
            if with_mlps and self.with_mlps and isinstance(unit.layout, GatedLayout):
                act = mlp.get_submodule(unit.layout.act)
                handles.append(act.register_forward_hook(lambda m, args, out, i=i: taps.__setitem__(f"g{i}", out)))
        total = weight = 0.0
        was_training = model.training
        model.eval()
        try:
            for held, batch in [(False, b) for b in fit_batches] + [(True, b) for b in eval_batches]:
                taps.clear()
                inputs = batch if held else {k: v for k, v in batch.items() if k != "labels"}
                out = model(**inputs)
                if held and getattr(out, "loss", None) is not None:
                    n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
                    total, weight = total + float(out.loss) * n, weight + n
                self._update(taps, batch.get("attention_mask"), held, starts, with_mlps and self.with_mlps)
                progress.update(1)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        self.gate_means = {i: s / self._gate_counts[i] for i, s in self._gate_sums.items()}
        return total / weight if weight else math.nan

    def _update(self, taps: dict[str, torch.Tensor], mask: torch.Tensor | None, held: bool, starts: list[int],
                with_mlps: bool) -> None:
        keep = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) else None

        def flat(name: str) -> torch.Tensor:
            tensor = taps[name]
            tensor = tensor.reshape(-1, tensor.shape[-1]).float()
            return tensor[keep] if keep is not None and keep.numel() == tensor.shape[0] else tensor

        count = len(self.stack)
        hidden = [flat(f"h{i}") for i in range(count + 1)]
        weights = [1.0 / h.pow(2).sum(1).clamp(min=1e-12) for h in hidden]
        side = 1 if held else 0
        if with_mlps:
            for i in range(count):
                x, m = flat(f"x{i}"), flat(f"m{i}")
                pair = self.mlp.setdefault(i, tuple(ResidualFitStats(x.shape[1], m.shape[1], 1, x.device, bias=True)
                                                    for _ in range(2)))
                pair[side].update(x, [m], weights[i])
                if f"g{i}" in taps and not held:
                    g = flat(f"g{i}")
                    self._gate_sums[i] = self._gate_sums.get(i, 0) + g.double().sum(0)
                    self._gate_counts[i] = self._gate_counts.get(i, 0) + g.shape[0]
        for start in starts:
            lengths = [n for n in self.lengths if start + n <= count]
            if not lengths:
                continue
            m = flat(f"m{start - 1}")
            targets = [hidden[start + n] - hidden[start] + m for n in lengths]
            pair = self.spans.setdefault(start, tuple(ResidualFitStats(m.shape[1], m.shape[1], len(lengths), m.device)
                                                      for _ in range(2)))
            pair[side].update(m, targets, weights[start])


def _passes(stack: DecoderStack, model: nn.Module, lengths: list[int], memory: int) -> list[list[int]]:
    """Span starts in groups whose sums (fitting and held-out) fit in ``memory`` bytes: one pass per group."""
    d = stack.mlps[0].layout.dims(stack.mlps[0].owner(model)).d_out
    starts = list(range(1, len(stack))) if lengths else []
    per_start = 2 * 8 * d * d * (1 + len(lengths))
    groups: list[list[int]] = [[]]
    for start in starts:
        if groups[-1] and (len(groups[-1]) + 1) * per_start > memory:
            groups.append([])
        groups[-1].append(start)
    return groups
