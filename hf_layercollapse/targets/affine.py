"""The whole unit becomes a learnable affine map of its input: a full matrix (:class:`Affine`), or the fitted map
frozen plus a trainable low-rank correction (:class:`LowRankAffine`, for models whose d×d maps would not fit)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

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
        host._unit_output = (self.apply_map(host.target_tensors(), x.to(z.dtype)), alpha)
        return host.activation(z)

    def apply_map(self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``W·x + b`` in ``x``'s dtype."""
        dtype = x.dtype
        return F.linear(x, tensors["affine_weight"].to(dtype), tensors["affine_bias"].to(dtype))

    def merged_weight(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``W`` of the merged projection."""
        return tensors["affine_weight"]

    def attach(self, host: Host, owner: nn.Module, layout: Layout) -> list[RemovableHandle]:
        # a gated block may run act(gate(x)) before up(x): x is seen by both
        handles = [owner.get_submodule(path).register_forward_pre_hook(host._see_input) for path in layout.inputs]
        return [*handles, owner.get_submodule(layout.output).register_forward_hook(host._blend_output)]

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
        weight, bias = (None if t is None else t.detach().to(output.weight.device,
                                                             torch.promote_types(t.dtype, torch.float32))
                        for t in (self.merged_weight(tensors), tensors.get("affine_bias")))
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
        return cls() if entry.get("affine") and "affine_rank" not in entry else None

    def describe(self) -> str:
        return "the whole block is a learnable affine map W·x + b, started at its least-squares fit on calibration data"


@dataclass(frozen=True, kw_only=True)
class LowRankAffine(Affine):
    """:class:`Affine` for models whose full ``d_out × d_in`` maps would not fit in training memory: the fitted map
    ``W₀`` is a fixed buffer and the trainable part is a rank-``rank`` correction, ``(W₀ + B·A)·x + b`` (``A``
    ``[rank, d_in]`` random, ``B`` ``[d_out, rank]`` zero, so it starts at the fit; ``b`` learnable), LoRA's
    construction applied to the target (``A`` drawn from a fixed seed, so fitting never moves the global random
    stream). ``rank·(d_in + d_out) + d_out`` trainable values per unit instead of
    ``d_out·(d_in + 1)``; merged into one projection like :class:`Affine`. The target of
    ``LayerCollapseConfig(linear_target="affine", affine_rank=rank)``, also through PEFT.

    Args:
        rank: Rank of the trainable correction ``B·A``.
        relative: As :class:`Affine`.
        ridge: As :class:`Affine`.

    Example:
        >>> import torch
        >>> from hf_layercollapse.targets import LowRankAffine
        >>> from hf_layercollapse.units import PlainLayout
        >>> block = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        >>> target = LowRankAffine(rank=2)
        >>> {k: v for k, v in target.shapes(PlainLayout("0", "1", "2"), block).items()}
        {'affine_weight': (8, 8), 'affine_bias': (8,), 'affine_lora_A': (2, 8), 'affine_lora_B': (8, 2)}
        >>> target.trainable_names
        ('affine_bias', 'affine_lora_A', 'affine_lora_B')
    """

    rank: int = 8
    name = "low_rank_affine"
    tensor_names = ("affine_weight", "affine_bias", "affine_lora_A", "affine_lora_B")
    fixed_names = ("affine_weight",)
    record_format = 4

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LowRankAffine(rank={self.rank!r}): the rank must be a positive int.")

    def solve(self, layout: Layout, owner: nn.Module, stats: Mapping[Request, Statistics]) -> dict[str, torch.Tensor]:
        fitted = super().solve(layout, owner, stats)
        weight = fitted["affine_weight"]
        d_out, d_in = weight.shape
        # A as LoRA's (nn.Linear's uniform init) from a fixed seed: fitting never moves the global random stream
        # (a refit during training must not change the data order), and PEFT and get_collapse_model agree; B = 0,
        # so the unit starts at the fit
        bound = 1.0 / math.sqrt(d_in)
        generator = torch.Generator().manual_seed(0)
        lora_a = (torch.rand(self.rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        return {**fitted, "affine_lora_A": lora_a.to(weight.dtype),
                "affine_lora_B": torch.zeros(d_out, self.rank, dtype=weight.dtype)}

    def shapes(self, layout: Layout, owner: nn.Module) -> dict[str, tuple[int, ...]]:
        d_in, _, d_out = layout.dims(owner)
        return {**super().shapes(layout, owner), "affine_lora_A": (self.rank, d_in),
                "affine_lora_B": (d_out, self.rank)}

    def apply_map(self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        low_rank = F.linear(F.linear(x, tensors["affine_lora_A"].to(dtype)), tensors["affine_lora_B"].to(dtype))
        return super().apply_map(tensors, x) + low_rank

    def merged_weight(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        wide = torch.promote_types(tensors["affine_weight"].dtype, torch.float32)
        return tensors["affine_weight"].to(wide) + tensors["affine_lora_B"].to(wide) @ tensors["affine_lora_A"].to(wide)

    def record(self) -> dict[str, Any]:
        return {**super().record(), "affine_rank": self.rank}

    @classmethod
    def from_record(cls, entry: Mapping[str, Any], layout: Layout) -> LowRankAffine | None:
        rank = entry.get("affine_rank")
        if not entry.get("affine") or rank is None:
            return None
        return cls(rank=rank)  # a bad rank raises: target_from_record names the unit and the corrupt record

    def describe(self) -> str:
        return (f"the whole block is an affine map W·x + b: its least-squares fit on calibration data plus a learnable "
                f"rank-{self.rank} correction")
