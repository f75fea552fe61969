"""`CollapsePlan`: what the planner measured and chose, saved and applied to the model it was made for.

A plan holds one :class:`PlannedBlock` per candidate unit (its measured costs, the merge chosen, the parameters it
saves) and the selection. It carries a fingerprint of the weights each selected unit was fitted on, so a plan applies
to that model only. Applying it merges the MLP blocks (recorded in the checkpoint, as ``collapse_model`` does) and
cuts the spans of decoder layers (which leaves the stock architecture, with fewer layers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from ..checkpoint import to_base_name
from ..collapse import check_no_unmerged_adapters, in_model_order, install_merge, model_params, unselected_rows
from ..errors import LayerCollapseConfigError
from ..modules import PROJECTIONS, base_prefix, join
from ..record import CollapseRecord
from ..report import BlockReport, CollapseReport
from ..saving import atomic_folder, verify_manifest
from ..targets import Affine, Identity
from ..units import BlockKind, Cut, Layout, SpanLayout, Unit, cut_layers, decoder_stack, find_mlp_blocks

logger = logging.getLogger(__name__)

PLAN_FILE, WEIGHTS_FILE = "collapse_plan.json", "collapse_plan.safetensors"
#: The merges a plan can choose: for MLP blocks "exact" (plain: W2·W1), "constant_gate" (gated: the gate at its
#: calibration mean), "fitted_gate" (the constant gate fitted to the block's output), "least_squares" and
#: "relative_least_squares" (the affine map fitted to the block's output, each token's error absolute or relative to
#: its size); for spans of decoder layers "cut" (removed), "fused_map" (a fitted map fused into the output projection of
#: the layer before) and "refit" (that projection fitted anew, from its own inputs, to stand in for the span).
METHODS = ("exact", "constant_gate", "fitted_gate", "least_squares", "relative_least_squares", "cut", "fused_map",
           "refit")


def simple_method(kind: BlockKind) -> str:
    """The merge every unit has: ``W2·W1`` (plain), the gate at its calibration mean (gated), the cut (span)."""
    return {BlockKind.GATED: "constant_gate", BlockKind.SPAN: "cut"}.get(kind, "exact")


def _costs(row: dict) -> dict[str, float]:
    """A saved candidate's costs (plans written by hf_layercollapse 0.1 before ``costs`` existed kept two)."""
    if "costs" in row:
        return dict(row["costs"])
    simple = simple_method(BlockKind(row["layout"]["kind"]))
    return {simple: row["cost_exact"], "least_squares": row["cost_least_squares"]}


@dataclass
class PlannedBlock:
    """One candidate unit: its measured costs and the merge the planner chose for it.

    ``name`` is the unit's name in reports (a span: ``model.layers.12-14``); ``owner`` the module holding it when that
    differs (a span: the layer list). ``weight``/``bias`` are the chosen map (an MLP block's ``[out, in]`` projection;
    a span's ``[d, d]`` map ``T``), ``None`` for the merges that need none. ``quality`` holds fit diagnostics measured
    on held-out tokens (``relative_error``, ``r2``) where the planner has them; ``fingerprint`` the hash of the
    weights the unit was fitted on."""

    name: str
    layout: Layout
    method: str
    costs: dict[str, float]
    params_saved: int
    weight: torch.Tensor | None = field(default=None, repr=False)
    bias: torch.Tensor | None = field(default=None, repr=False)
    owner: str | None = None
    quality: dict[str, float] = field(default_factory=dict)
    fingerprint: str | None = None

    @property
    def cost(self) -> float:
        """Cost of the chosen merge."""
        return self.costs[self.method]

    @property
    def cost_exact(self) -> float:
        """Cost of the simple merge (see :func:`simple_method`)."""
        return self.costs[simple_method(self.layout.kind)]

    @property
    def cost_least_squares(self) -> float:
        return self.costs["least_squares"]

    @property
    def unit(self) -> Unit:
        return Unit(self.owner if self.owner is not None else self.name, 0, self.layout)


def fingerprint(model: nn.Module, unit: Unit) -> str:
    """SHA-256 of the shapes, dtypes and bytes of every parameter of ``unit``'s modules in ``model`` (in the unit's
    order; where the unit sits does not count, what its weights are does)."""
    digest = hashlib.sha256()
    owner = unit.owner(model)
    for part in unit.layout.parts:
        for name, tensor in sorted(owner.get_submodule(part).named_parameters()):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CollapsePlan:
    """What :func:`~hf_layercollapse.plan_collapse` measured and chose; print it, save it, or apply it
    (:meth:`apply`, or ``collapse_model(model, plan=plan)``)."""

    selected: list[PlannedBlock]
    candidates: list[PlannedBlock]
    objective: str
    baseline: float
    measured_cost: float
    params_total: int
    #: other selections the planner measured for the same budget: {description: measured increase}
    alternatives: dict[str, float] = field(default_factory=dict)

    @property
    def params_saved(self) -> int:
        return sum(b.params_saved for b in self.selected)

    def to_dict(self) -> dict:
        def row(b: PlannedBlock) -> dict:
            data = {"name": b.name, "layout": b.layout.to_dict(), "method": b.method, "cost": b.cost,
                    "costs": b.costs, "params_saved": b.params_saved}
            for key in ("owner", "quality", "fingerprint"):
                if getattr(b, key):
                    data[key] = getattr(b, key)
            return data

        return {"objective": self.objective, "baseline": self.baseline, "measured_cost": self.measured_cost,
                "params_total": self.params_total, "params_saved": self.params_saved,
                "selected": [b.name for b in self.selected], "candidates": [row(b) for b in self.candidates],
                **({"alternatives": self.alternatives} if self.alternatives else {})}

    def __str__(self) -> str:
        chosen = {b.name for b in self.selected}
        shown = self.candidates if len(self.candidates) <= 40 else [b for b in self.candidates if b.name in chosen]
        methods = [m for m in METHODS if any(m in b.costs for b in shown)]
        rows = [("unit", "kind", "chosen", "merge", *(f"cost ({m})" for m in methods), "held-out fit", "params saved")]
        for b in shown:
            costs = [f"{b.costs[m]:+.4g}" if m in b.costs else "" for m in methods]
            quality = f"rel. err {b.quality['relative_error']:.3g}" if "relative_error" in b.quality else ""
            rows.append((b.name, b.layout.kind.value, "yes" if b.name in chosen else "", b.method, *costs, quality,
                         f"{b.params_saved:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if len(shown) < len(self.candidates):
            lines.append(f"({len(self.candidates) - len(shown)} more candidates measured, not chosen)")
        fraction = 100 * self.params_saved / self.params_total if self.params_total else 0.0
        lines.append(f"{self.objective}: baseline {self.baseline:.4g}; {len(self.selected)} units chosen, measured "
                     f"increase {self.measured_cost:+.4g}; parameters saved {self.params_saved:,} ({fraction:.2f}%)")
        for description, cost in self.alternatives.items():
            lines.append(f"  also measured: {description}: {cost:+.4g}")
        return "\n".join(lines)

    def apply(self, model: nn.Module) -> CollapseReport:
        """Apply the plan to ``model`` in place (what ``collapse_model(model, plan=plan)`` does): merge its MLP blocks
        (recorded in the checkpoint) and cut its spans of decoder layers (the stock architecture with fewer layers).
        Everything is checked before anything changes, the weights' fingerprints included."""
        return apply_plan(model, self)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``collapse_plan.json`` and the chosen maps (``collapse_plan.safetensors``) to ``directory``, atomically
        (a reader sees the previous plan or this one)."""
        tensors = {f"{b.name}.{k}": v.contiguous() for b in self.candidates
                   for k, v in (("weight", b.weight), ("bias", b.bias)) if v is not None}
        with atomic_folder(directory, owned=tuple(re.escape(n) for n in (PLAN_FILE, WEIGHTS_FILE))) as folder:
            save_file(tensors, str(folder / WEIGHTS_FILE))
            (folder / PLAN_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CollapsePlan:
        directory = Path(directory)
        if directory.is_dir():
            verify_manifest(directory)  # a plan whose maps were edited or mixed with another save: refused by file
        try:
            data = json.loads((directory / PLAN_FILE).read_text())
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, json.JSONDecodeError, SafetensorError) as err:
            raise ValueError(f"{directory} does not hold a readable collapse plan ({PLAN_FILE}, {WEIGHTS_FILE}): "
                             f"{err}") from err
        try:
            _check_plan_fields(data)
            candidates = [PlannedBlock(c["name"], Layout.from_dict(c["layout"], f"the layout of {c['name']!r}"),
                                       c["method"], _costs(c), c["params_saved"], tensors.get(f"{c['name']}.weight"),
                                       tensors.get(f"{c['name']}.bias"), c.get("owner"), dict(c.get("quality", {})),
                                       c.get("fingerprint")) for c in data["candidates"]]
            by_name = {b.name: b for b in candidates}
            return cls([by_name[n] for n in data["selected"]], candidates, data["objective"], data["baseline"],
                       data["measured_cost"], data["params_total"], dict(data.get("alternatives", {})))
        except LayerCollapseConfigError as err:
            raise LayerCollapseConfigError(f"{directory / PLAN_FILE}: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{directory / PLAN_FILE} is not a collapse plan written by CollapsePlan.save (missing "
                             f"or wrong entry {err}): write it again with plan_collapse(...).save().") from None


def _check_plan_fields(data) -> None:
    """Every field of a saved plan has its type (and a method its known name); else one error naming the unit."""
    if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
        raise LayerCollapseConfigError("'candidates' must be a list of units")
    if not isinstance(data.get("selected"), list) or not all(isinstance(n, str) for n in data["selected"]):
        raise LayerCollapseConfigError(f"'selected' must be a list of unit names, not {data.get('selected')!r}")
    number = (int, float)
    for field_name, kind in (("baseline", number), ("measured_cost", number), ("params_total", int)):
        if not isinstance(data.get(field_name), kind) or isinstance(data.get(field_name), bool):
            raise LayerCollapseConfigError(f"{field_name!r} must be a number, not {data.get(field_name)!r}")
    names = set()
    for c in data["candidates"]:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise LayerCollapseConfigError(f"every candidate must be an object with a 'name', not {c!r}")
        where = f"unit {c['name']!r}"
        names.add(c["name"])
        if c.get("method") not in METHODS:
            raise LayerCollapseConfigError(f"{where}: method={c.get('method')!r} is not one of {list(METHODS)}")
        if not isinstance(c.get("params_saved"), int) or isinstance(c.get("params_saved"), bool):
            raise LayerCollapseConfigError(f"{where}: params_saved={c.get('params_saved')!r} must be an integer")
        costs = c.get("costs", {})
        if not isinstance(costs, dict) or not all(isinstance(v, number) and not isinstance(v, bool)
                                                  for v in costs.values()):
            raise LayerCollapseConfigError(f"{where}: costs={costs!r} must map methods to numbers")
        if "costs" in c and c["method"] not in costs:
            raise LayerCollapseConfigError(f"{where}: its method {c['method']!r} has no cost in {sorted(costs)}")
        if not isinstance(c.get("layout"), dict):
            raise LayerCollapseConfigError(f"{where}: 'layout' must be an object, not {c.get('layout')!r}")
    unknown = [n for n in data["selected"] if n not in names]
    if unknown:
        raise LayerCollapseConfigError(f"the selected units {unknown} are not among the candidates")


# ------------------------------------------------------------------------------------------------------ applying
def replacement(model: nn.Module, planned: PlannedBlock) -> nn.Module:
    """The projection that replaces an MLP block of the plan."""
    owner = planned.unit.owner(model)
    if planned.method == "exact":
        return Identity().merge(planned.layout, owner, {})
    if planned.weight is None:
        raise ValueError(f"The plan has no fitted map for block {planned.name!r} ({planned.method}).")
    try:
        return Affine().merge(planned.layout, owner, {"affine_weight": planned.weight, "affine_bias": planned.bias})
    except ValueError as err:
        raise ValueError(f"The plan's map for {planned.name!r}: {err} The plan belongs to another model.") from None


def _check_applicable(model: nn.Module, plan: CollapsePlan) -> None:
    """The plan's units are in ``model``, hold the weights they were fitted on, are not wrapped by unmerged adapters,
    not merged yet, and recordable."""
    for planned in plan.selected:
        unit = planned.unit
        try:
            owner = unit.owner(model)
            for part in planned.layout.parts:
                owner.get_submodule(part)
        except AttributeError:
            raise ValueError(f"The plan's unit {planned.name!r} ({' → '.join(planned.layout.parts)}) is not in this "
                             f"{type(model).__name__}: the plan belongs to another model.") from None
        if not isinstance(owner.get_submodule(planned.layout.inputs[0]), PROJECTIONS):
            raise ValueError(f"The plan's unit {planned.name!r} is collapsed already: apply a plan once, to the model "
                             "it was made for.")
        if planned.fingerprint is not None and fingerprint(model, unit) != planned.fingerprint:
            raise LayerCollapseConfigError(
                f"The plan's unit {planned.name!r} was fitted on other weights than this model's (their fingerprint "
                "differs): the plan belongs to another model, or the model changed since it was planned. Make the "
                "plan again with plan_collapse on this model.")
    if any(p.fingerprint is None for p in plan.selected):
        logger.warning("The plan has no weight fingerprints (written by hf_layercollapse 0.1): it cannot be checked "
                       "that it belongs to this model.")
    mlps = [p for p in plan.selected if not isinstance(p.layout, SpanLayout)]
    check_no_unmerged_adapters(model, [p.unit for p in mlps])
    if isinstance(model, PreTrainedModel):  # records are kept for transformers models only
        for planned in mlps:
            to_base_name(model, planned.name)


def _renamed(name: str, stack: str, mapping: dict[int, int]) -> str:
    """``name`` after the layers of ``stack`` were renumbered by ``mapping`` (``KeyError``: the layer was removed)."""
    prefix = f"{stack}."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix):].partition(".")
    return join(f"{prefix}{mapping[int(index)]}", rest) if index.isdigit() else name


def apply_plan(model: nn.Module, plan: CollapsePlan) -> CollapseReport:
    """Apply the plan's units in place (:meth:`CollapsePlan.apply`)."""
    report = CollapseReport(model_params_before=model_params(model))
    _check_applicable(model, plan)  # everything is validated before anything changes
    spans = [p for p in plan.selected if isinstance(p.layout, SpanLayout)]
    mlps = [(p, replacement(model, p)) for p in plan.selected if not isinstance(p.layout, SpanLayout)]
    chosen = {p.name for p in plan.selected}
    left = [c.unit for c in plan.candidates if c.name not in chosen and not isinstance(c.layout, SpanLayout)]
    report.blocks += unselected_rows(model, left)  # the MLP blocks the plan leaves (candidates save parameters)
    rows = []
    for planned, merged in mlps:
        owner = planned.unit.owner(model)
        costs = planned.layout.costs(owner, merged.bias is not None)
        alpha = getattr(owner.get_submodule(planned.layout.act), "alpha_value", None)
        rows.append((planned, merged, alpha, costs))
    mapping = _cut(model, spans, report) if spans else None
    for planned, merged, alpha, costs in rows:
        name = planned.name if mapping is None else _renamed(planned.name, mapping[0], mapping[1])
        install_merge(model, Unit(name, 0, planned.layout), merged, alpha=alpha, method=planned.method)
        report.blocks.append(BlockReport(name, planned.layout.kind.value, alpha, "collapsed", planned.method, *costs))
    if mapping is not None:
        removed = sum(p.layout.length for p in spans)
        if CollapseRecord.of(model) is None:
            report.notes.append(f"{removed} decoder layers removed: the model is the stock {type(model).__name__} "
                                f"with {model.config.num_hidden_layers} layers; it saves with save_pretrained and "
                                "loads with plain transformers and other engines, without hf_layercollapse.")
        else:
            report.notes.append(f"{removed} decoder layers removed; the merged MLP blocks make it a LayerCollapse "
                                "checkpoint (it loads after `import hf_layercollapse`).")
    spans_first = [r for r in report.blocks if r.kind == BlockKind.SPAN.value]  # named by their old indices
    report.blocks = spans_first + in_model_order(model, [r for r in report.blocks if r not in spans_first])
    report.model_params_after = model_params(model)
    return report


def _cut(model: nn.Module, spans: list[PlannedBlock], report: CollapseReport) -> tuple[str, dict[int, int]]:
    """Cut the plan's spans; renumber the model's collapse record, if it has one. Returns the layer list's name and
    the old → new layer indices."""
    stack = decoder_stack(model, find_mlp_blocks(model))
    if {p.owner for p in spans} != {stack.name}:
        raise ValueError(f"The plan's spans belong to {sorted({p.owner for p in spans})}, not to this model's decoder "
                         f"layers {stack.name!r}: the plan belongs to another model.")
    removed = {i for p in spans for i in range(p.layout.start, p.layout.end)}
    record = CollapseRecord.of(model) if isinstance(model, PreTrainedModel) else None
    prefix = base_prefix(model)
    if record is not None:
        inside = [n for n in record.units if (full := join(prefix, n)).startswith(f"{stack.name}.")
                  and int(full[len(stack.name) + 1:].split(".")[0]) in removed]
        if inside:
            raise ValueError(f"The plan cuts layers that hold injected or collapsed blocks {inside}: cut the layers "
                             "before injecting or collapsing blocks in them.")
    layers = stack.layers(model)
    for p in spans:
        costs = p.layout.costs(layers, False)
        report.blocks.append(BlockReport(p.name, BlockKind.SPAN.value, None, "collapsed", p.method, *costs))
    cuts = [Cut(p.layout, transform=p.weight if p.method == "fused_map" else None,
                weight=p.weight if p.method == "refit" else None) for p in spans]
    mapping = cut_layers(model, stack, cuts)
    if record is not None:
        record.units = {_renamed(join(prefix, n), stack.name, mapping)[len(prefix) + 1 if prefix else 0:]: u
                        for n, u in record.units.items()}
        record.write(model)
    kept = []
    for row in report.blocks:
        if row.kind != BlockKind.SPAN.value:
            try:
                row.name = _renamed(row.name, stack.name, mapping)
            except KeyError:  # a block of a layer that was cut
                continue
        kept.append(row)
    report.blocks = kept
    return stack.name, mapping
