"""A gated block's gate becomes a learnable constant ``c`` (:class:`GateConstant`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..merging import merge_gated
from ..modules import linear_weight
from ..statistics import GateRequest, Request, Statistics
from ..units import BlockKind, GatedLayout, Layout
from .base import Host, LinearTarget

FITS = ("mean", "least_squares")


@dataclass(frozen=True)
class GateConstant(LinearTarget):
    """``(1−α)·act(gate(x)) + α·c`` in ``down(· ⊙ up(x))``: ``down(act(gate(x)) ⊙ up(x))`` stays bilinear when ``act``
    is linear, so the gate goes to a constant instead; at α = 1 the block is ``W_down·diag(c)·W_up``, one map.

    Args:
        fit: How ``c`` starts (and is refitted): ``"mean"``, the per-channel mean of ``act(gate(x))`` on calibration
            data; ``"least_squares"``, the ``c`` whose merged block is closest to the block's output (relative squared
            error, closed form: :meth:`~hf_layercollapse.statistics.GateStats.fit`).
        ridge: Ridge of the least-squares fit, relative to the mean of the normal matrix's diagonal.
    """

    fit: str = "mean"
    ridge: float = 1e-4
    name = "gate_constant"
    tensor_names = ("gate_constant",)
    trainable = True

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"GateConstant(fit={self.fit!r}): use one of {FITS}.")

    @property
    def method(self) -> str:  # type: ignore[override]
        return "fitted_gate" if self.fit == "least_squares" else "constant_gate"

    def supports(self, layout: Layout) -> bool:
        return layout.kind is BlockKind.GATED

    def requests(self, layout: Layout) -> tuple[Request, ...]:
        return (GateRequest(fit=self.fit == "least_squares"),)

    def solve(self, layout: Layout, owner: nn.Module, stats: Mapping[Request, Statistics]) -> dict[str, torch.Tensor]:
        gate = stats[self.requests(layout)[0]]
        if self.fit == "mean":
            return {"gate_constant": gate.mean()}
        return {"gate_constant": gate.fit(linear_weight(owner.get_submodule(layout.down)), self.ridge)}

    def shapes(self, layout: Layout, owner: nn.Module) -> dict[str, tuple[int, ...]]:
        return {"gate_constant": (layout.channels(owner),)}

    def blend(self, host: Host, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return torch.lerp(host.activation(z), host.target_tensors()["gate_constant"].to(z.dtype), alpha)

    def merge(self, layout: Layout, owner: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
        assert isinstance(layout, GatedLayout)
        return merge_gated(layout.up_weight(owner), owner.get_submodule(layout.down), tensors["gate_constant"])

    def record(self) -> dict[str, Any]:
        return {"mode": "blend", **({"fitted_gate": True} if self.fit == "least_squares" else {})}

    @classmethod
    def from_record(cls, entry: Mapping[str, Any], layout: Layout) -> GateConstant | None:
        if layout.kind is not BlockKind.GATED:
            return None
        return cls("least_squares" if entry.get("fitted_gate") else "mean")

    def describe(self) -> str:
        start = " started at its least-squares fit on calibration data" if self.fit == "least_squares" else ""
        return f"a gated block's gate is a learnable constant c{start}, so the block is W_down·diag(c)·W_up"
