"""Linear targets: what a unit becomes at α = 1 (see :class:`LinearTarget`), and which one a config or a checkpoint
record asks for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import LayerCollapseConfigError
from ..units import BlockKind, Layout
from .affine import Affine, LowRankAffine
from .base import LinearTarget
from .gate import GateConstant
from .identity import Identity, PReLU
from .line import Line

__all__ = [
    "ACTIVATIONS",
    "LINEAR_TARGETS",
    "Affine",
    "GateConstant",
    "Identity",
    "Line",
    "LinearTarget",
    "LowRankAffine",
    "PReLU",
    "planner_candidates",
    "target_for",
    "target_from_record",
]

#: The values of ``LayerCollapseConfig.activation`` and ``linear_target``.
ACTIVATIONS = ("blend", "prelu")
LINEAR_TARGETS = ("default", "fitted", "affine")

#: The target a config's ``linear_target`` chooses for each kind of unit (``activation="blend"``).
_CHOICES: dict[tuple[str, BlockKind], LinearTarget] = {
    ("default", BlockKind.PLAIN): Identity(),
    ("default", BlockKind.GATED): GateConstant("mean"),
    ("fitted", BlockKind.PLAIN): Line(),
    ("fitted", BlockKind.GATED): GateConstant("least_squares"),
    ("affine", BlockKind.PLAIN): Affine(),
    ("affine", BlockKind.GATED): Affine(),
}
#: Targets in the order a record is matched against them (the first whose ``from_record`` answers wins).
_RECORD_ORDER: tuple[type[LinearTarget], ...] = (LowRankAffine, Affine, Line, PReLU, GateConstant, Identity)


def target_for(layout: Layout, linear_target: str = "default", activation: str = "blend",
               affine_rank: int | None = None) -> LinearTarget:
    """The target of a unit with ``layout`` under a config's ``linear_target``, ``activation`` and ``affine_rank``
    (``linear_target="affine"`` only: the rank of a :class:`LowRankAffine`'s trainable correction).

    Example:
        >>> from hf_layercollapse.units import GatedLayout, PlainLayout
        >>> target_for(PlainLayout("fc1", "act", "fc2"), "fitted"), target_for(GatedLayout("g", "u", "a", "d"))
        (Line(), GateConstant(fit='mean', ridge=0.0001))
        >>> target_for(PlainLayout("fc1", "act", "fc2"), "affine", affine_rank=4)
        LowRankAffine(relative=True, ridge=0.0001, rank=4)
    """
    if activation == "prelu":
        if layout.kind is not BlockKind.PLAIN:
            raise ValueError(f"activation='prelu' cannot be used on {layout.kind.value} MLP blocks: a gated block "
                             "collapses by blending its gate towards a constant (activation='blend'). Use 'blend', or "
                             "select plain blocks only.")
        return PReLU()
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported: use one of {ACTIVATIONS}.")
    if affine_rank is not None:
        if linear_target != "affine":
            raise ValueError(f"affine_rank={affine_rank!r} is the rank of the affine target's trainable correction: "
                             f"it needs linear_target='affine', not {linear_target!r}.")
        return LowRankAffine(rank=affine_rank)
    try:
        return _CHOICES[linear_target, layout.kind]
    except KeyError:
        raise ValueError(f"linear_target={linear_target!r} is not supported for {layout.kind.value} blocks: use one "
                         f"of {LINEAR_TARGETS}.") from None


def target_from_record(entry: Mapping[str, Any], layout: Layout, where: str = "the unit") -> LinearTarget:
    """The target an injected unit's checkpoint record says; :class:`LayerCollapseConfigError` when the record asks
    for something this unit cannot have."""
    mode = entry.get("mode", "blend")
    if mode not in ACTIVATIONS:
        raise LayerCollapseConfigError(f"{where} has mode {mode!r}; known modes are {ACTIVATIONS}.")
    flags = {k: v for k, v in entry.items() if k in ("mode", "line", "affine", "affine_rank", "fitted_gate")}
    try:
        target = next((t for cls in _RECORD_ORDER if (t := cls.from_record(entry, layout)) is not None), None)
    except ValueError as err:
        raise LayerCollapseConfigError(f"{where} is recorded with {flags}: {err} The record is corrupt or was "
                                       "edited.") from None
    if target is None or not target.supports(layout) or (mode == "prelu" and not isinstance(target, PReLU)):
        raise LayerCollapseConfigError(f"{where} is a {layout.kind.value} block recorded with {flags}: no linear "
                                       "target of that kind exists for it. The record is corrupt or was edited.")
    return target


def planner_candidates(layout: Layout, ridge: float = 1e-4) -> list[LinearTarget]:
    """The merges the calibration planner measures for a unit: the simple one first (``W2·W1``, or the gate at its
    mean), a gated block's fitted gate, and the least-squares affine maps, plain and relative."""
    if layout.kind is BlockKind.PLAIN:
        simple: list[LinearTarget] = [Identity()]
    else:
        simple = [GateConstant("mean", ridge), GateConstant("least_squares", ridge)]
    return [*simple, Affine(relative=False, ridge=ridge), Affine(relative=True, ridge=ridge)]
