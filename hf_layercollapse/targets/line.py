"""A plain block's activation becomes each channel's least-squares line ``a·z + b`` (:class:`Line`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..merging import merge_projections
from ..statistics import LineRequest, Request, Statistics
from ..units import BlockKind, Layout
from .base import Host, LinearTarget


@dataclass(frozen=True)
class Line(LinearTarget):
    """``(1−α)·act(z) + α·(slope·z + offset)`` with each channel's least-squares line of the activation on calibration
    data (fixed buffers ``slope`` and ``offset``). A GELU channel that is mostly negative is close to 0, not to the
    identity, so the line is a far smaller change than the identity; at α = 1 the block is ``W2·diag(a)·W1``."""

    name = "line"
    tensor_names = ("slope", "offset")
    record_format = 2

    def supports(self, layout: Layout) -> bool:
        return layout.kind is BlockKind.PLAIN

    def requests(self, layout: Layout) -> tuple[Request, ...]:
        return (LineRequest(),)

    def solve(self, layout: Layout, owner: nn.Module, stats: Mapping[Request, Statistics]) -> dict[str, torch.Tensor]:
        slope, offset = stats[LineRequest()].solve()
        return {"slope": slope, "offset": offset}

    def shapes(self, layout: Layout, owner: nn.Module) -> dict[str, tuple[int, ...]]:
        channels = layout.channels(owner)
        return {"slope": (channels,), "offset": (channels,)}

    def blend(self, host: Host, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        tensors = host.target_tensors()
        line = torch.addcmul(tensors["offset"].to(z.dtype), tensors["slope"].to(z.dtype), z)
        return torch.lerp(host.activation(z), line, alpha)

    def merge(self, layout: Layout, owner: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
        return merge_projections(owner.get_submodule(layout.fc1), owner.get_submodule(layout.fc2),
                                 (tensors["slope"], tensors["offset"]))

    def merged_bias(self, layout: Layout, owner: nn.Module) -> bool:
        return True

    def record(self) -> dict[str, Any]:
        return {"mode": "blend", "line": True}

    @classmethod
    def from_record(cls, entry: Mapping[str, Any], layout: Layout) -> Line | None:
        return cls() if entry.get("line") else None

    def describe(self) -> str:
        return ("each channel's activation in a plain block is its least-squares line a·z + b on calibration data, so "
                "the block is W₂·diag(a)·W₁ plus a bias")
