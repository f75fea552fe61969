"""The paper's targets: a plain block's activation becomes the identity, blended (:class:`Identity`) or through the
paper's PReLU (:class:`PReLU`); at α = 1 the block is ``W2·W1``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..merging import merge_projections
from ..units import BlockKind, Layout
from .base import Host, LinearTarget


@dataclass(frozen=True)
class Identity(LinearTarget):
    """``(1−α)·act(z) + α·z``: exactly the original block at α = 0, the identity at α = 1.

    Example:
        >>> import torch
        >>> from hf_layercollapse.activation import CollapsibleActivation
        >>> act = CollapsibleActivation(torch.nn.GELU(), Identity(), init_alpha=1.0)
        >>> z = torch.randn(3)
        >>> torch.equal(act(z), z)
        True
    """

    name = "identity"
    method = "exact"

    def supports(self, layout: Layout) -> bool:
        return layout.kind is BlockKind.PLAIN

    def blend(self, host: Host, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        # torch.lerp(a, b, w) = a + w·(b − a) in one kernel, exactly a at w = 0 and exactly b at w = 1
        return torch.lerp(host.activation(z), z, alpha)

    def merge(self, layout: Layout, owner: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
        return merge_projections(owner.get_submodule(layout.fc1), owner.get_submodule(layout.fc2))

    def record(self) -> dict[str, Any]:
        return {"mode": "blend"}

    @classmethod
    def from_record(cls, entry: Mapping[str, Any], layout: Layout) -> Identity | None:
        return cls() if layout.kind is BlockKind.PLAIN and entry.get("mode", "blend") == "blend" else None

    def describe(self) -> str:
        return "a plain block's activation is the identity, so the block is W₂·W₁ with b = W₂·b₁ + b₂"


@dataclass(frozen=True)
class PReLU(Identity):
    """The paper's activation: PReLU with slope α on the negative side (``z`` where ``z ≥ 0``, else ``α·z``); it
    replaces the original activation (a ReLU at α = 0) and is the identity at α = 1."""

    name = "prelu"
    method = None

    def blend(self, host: Host, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return torch.where(z >= 0, z, alpha * z)

    def record(self) -> dict[str, Any]:
        return {"mode": "prelu"}

    @classmethod
    def from_record(cls, entry: Mapping[str, Any], layout: Layout) -> PReLU | None:
        return cls() if layout.kind is BlockKind.PLAIN and entry.get("mode") == "prelu" else None

    def describe(self) -> str:
        return "the PReLU of slope 1 is the identity, so the block is W₂·W₁ with b = W₂·b₁ + b₂"
