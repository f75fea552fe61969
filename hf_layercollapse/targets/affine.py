"""The whole unit becomes a learnable affine map of its input (:class:`Affine`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..modules import projection_from
from ..statistics import LeastSquaresRequest, Request, Statistics
from ..units import Layout, MLPLayout
from .base import Host, LinearTarget


@dataclass(frozen=True)
class Affine(LinearTarget):
    """``(1−α)·unit(x) + α·(W·x + b)`` with the affine map of the unit's input closest to its output on calibration
    data (``W`` ``[d_out, d_in]`` and ``b`` learnable: ``affine_weight``, ``affine_bias``); at α = 1 the unit is that
    map. The richest target: a line per channel or a constant gate is one of the maps it can be.

    The activation itself is left as it is: the host computes the map of the unit input ``x`` (seen by pre-hooks on
    the input projections) in its ``forward`` and a hook on the output projection blends it in, so the map's
    parameters, like α, are only read inside ``forward``.

    Args:
        relative: Each token's error counts relative to the size of its output (the fit that was not catastrophic on
            the real SmolLM2-135M's blocks); ``False``: plain least squares.
        ridge: Ridge of the fit, relative to the mean input energy.
    """

    relative: bool = True
    ridge: float = 1e-4
    name = "affine"
    tensor_names = ("affine_weight", "affine_bias")
    trainable = True
    record_format = 3
    replaces_unit = True

    @property
    def method(self) -> str:  # type: ignore[override]
        return "relative_least_squares" if self.relative else "least_squares"

    def supports(self, layout: Layout) -> bool:
        return isinstance(layout, MLPLayout)

    def requests(self, layout: Layout) -> tuple[Request, ...]:
        return (LeastSquaresRequest(relative=self.relative),)

    def solve(self, layout: Layout, owner: nn.Module, stats: Mapping[Request, Statistics]) -> dict[str, torch.Tensor]:
        weight, bias = stats[self.requests(layout)[0]].solve(self.ridge)
        return {"affine_weight": weight, "affine_bias": bias}

    def shapes(self, layout: Layout, owner: nn.Module) -> dict[str, tuple[int, ...]]:
        d_in, _, d_out = layout.dims(owner)
        return {"affine_weight": (d_out, d_in), "affine_bias": (d_out,)}

    def blend(self, host: Host, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        x, host._unit_input = host._unit_input, None
        if x is None:
            raise RuntimeError(f"{host.where()}: the activation ran before the block's input projection, so the "
                               "affine target has no input; use linear_target='fitted' for this architecture.")
        tensors = host.target_tensors()
        dtype = z.dtype
        host._unit_output = (F.linear(x.to(dtype), tensors["affine_weight"].to(dtype),
                                      tensors["affine_bias"].to(dtype)), alpha)
        return host.activation(z)

    def attach(self, host: Host, owner: nn.Module, layout: Layout) -> None:
        for path in layout.inputs:  # a gated block may run act(gate(x)) before up(x): x is seen by both
            owner.get_submodule(path).register_forward_pre_hook(host._see_input)
        owner.get_submodule(layout.output).register_forward_hook(host._blend_output)

    def on_input(self, host: Host, x: torch.Tensor) -> None:
        host._unit_input = x

    def on_output(self, host: Host, output: torch.Tensor) -> torch.Tensor:
        computed, host._unit_output, host._unit_input = host._unit_output, None, None
        if computed is None:
            raise RuntimeError(f"{host.where()}: the output projection ran without the activation before it, so "
                               "there is no affine target to blend in; use linear_target='fitted' for this "
                               "architecture.")
        target, alpha = computed
        return torch.lerp(output, target.to(output.dtype), alpha.to(output.dtype))

    def merge(self, layout: Layout, owner: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
        output = owner.get_submodule(layout.output)
        weight, bias = (None if tensors.get(k) is None else tensors[k].detach().to(
            output.weight.device, torch.promote_types(tensors[k].dtype, torch.float32))
            for k in ("affine_weight", "affine_bias"))
        d_in, _, d_out = layout.dims(owner)
        if tuple(weight.shape) != (d_out, d_in) or (bias is not None and tuple(bias.shape) != (d_out,)):
            raise ValueError(f"The affine map is {tuple(weight.shape)} (bias "
                             f"{None if bias is None else tuple(bias.shape)}) but the block maps {d_in} -> {d_out} "
                             "features.")
        return projection_from(output, weight, bias)

    def merged_bias(self, layout: Layout, owner: nn.Module) -> bool:
        return True

    def record(self) -> dict[str, Any]:
        return {"mode": "blend", "affine": True}

    @classmethod
    def from_record(cls, entry: Mapping[str, Any], layout: Layout) -> Affine | None:
        return cls() if entry.get("affine") else None

    def describe(self) -> str:
        return "the whole block is a learnable affine map W·x + b, started at its least-squares fit on calibration data"
