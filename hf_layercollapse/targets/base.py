"""`LinearTarget`: what a unit becomes at α = 1, as one strategy object per kind of target.

A target knows everything that differs between the kinds: which units it applies to, which calibration statistics
fit it and how (``requests`` / ``solve``), which tensors it adds to the unit (``tensor_names``: learnable parameters
when ``trainable``, fixed buffers otherwise) and their shapes for loading (``placeholders``), how the unit computes
at α (``blend``, and for targets that replace the whole unit ``attach`` / ``on_input`` / ``on_output``), how the
linear unit merges into one projection (``merge``), how it is recorded in a checkpoint (``record`` / ``from_record``)
and described in a model card. Targets hold options (a fit rule, a ridge), never tensors: the module that hosts a
unit (an injected activation, or a PEFT layer with one set of tensors per adapter) keeps the tensors and hands them
to the target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..statistics import Request, Statistics
from ..units import Layout


class Host(Protocol):
    """What a target needs from the module hosting an injected unit (:class:`~hf_layercollapse.activation.
    Host`): the original activation, its tensors, and two slots for targets that replace the unit."""

    activation: nn.Module
    _unit_input: torch.Tensor | None
    _unit_output: tuple[torch.Tensor, torch.Tensor] | None

    def target_tensors(self) -> dict[str, torch.Tensor]: ...

    def where(self) -> str: ...

    def _see_input(self, module: nn.Module, args: tuple) -> None: ...

    def _blend_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor: ...


class LinearTarget(ABC):
    """One kind of linear target (see the module docstring). Subclasses are frozen dataclasses of their options."""

    #: The target's name (what :func:`~hf_layercollapse.targets.target_from_record` and reports call it).
    name: ClassVar[str]
    #: Names of the tensors the target adds to a unit, as they appear in state dicts (``...act.<name>``).
    tensor_names: ClassVar[tuple[str, ...]] = ()
    #: Whether those tensors train (``nn.Parameter``, no weight decay) or stay fixed (buffers).
    trainable: ClassVar[bool] = False
    #: Tensors that stay fixed buffers although the target trains (a low-rank target's fitted map).
    fixed_names: ClassVar[tuple[str, ...]] = ()
    #: The oldest checkpoint-record format that holds this target.
    record_format: ClassVar[int] = 1
    #: Whether the target replaces the whole unit's output (hooks on the unit's projections) rather than the
    #: activation's.
    replaces_unit: ClassVar[bool] = False
    #: The name the calibration planner gives a merge towards this target (``None``: the planner does not use it).
    method: ClassVar[str | None] = None

    @classmethod
    def trainable_tensor(cls, name: str) -> bool:
        """Whether the target's tensor ``name`` trains (an ``nn.Parameter``) rather than stays a fixed buffer."""
        return cls.trainable and name not in cls.fixed_names

    @property
    def trainable_names(self) -> tuple[str, ...]:
        """The tensors of :attr:`tensor_names` that train."""
        return tuple(n for n in self.tensor_names if self.trainable_tensor(n))

    # ------------------------------------------------------------------------------------------ applicability
    @abstractmethod
    def supports(self, layout: Layout) -> bool:
        """Whether a unit of this layout can blend towards (and merge into) this target."""

    # ------------------------------------------------------------------------------------------ fitting
    def requests(self, layout: Layout) -> tuple[Request, ...]:
        """The statistics that fit this target on a unit (none: nothing to fit)."""
        return ()

    def solve(self, layout: Layout, owner: nn.Module, stats: Mapping[Request, Statistics]) -> dict[str, torch.Tensor]:
        """The target's tensors fitted from ``stats`` (the accumulators of :meth:`requests`), fp64 or wider."""
        return {}

    def placeholders(self, layout: Layout, owner: nn.Module) -> dict[str, torch.Tensor]:
        """Zero tensors of the right shapes on the unit's device and dtype (a checkpoint fills them)."""
        weight = owner.get_submodule(layout.output).weight
        like = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        return {name: torch.zeros(shape, **like) for name, shape in self.shapes(layout, owner).items()}

    def shapes(self, layout: Layout, owner: nn.Module) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor in :attr:`tensor_names`."""
        return {}

    # ------------------------------------------------------------------------------------------ forward
    @abstractmethod
    def blend(self, host: Host, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The activation's output at ``alpha`` (already in ``z``'s dtype) for activation input ``z``."""

    def attach(self, host: Host, owner: nn.Module, layout: Layout) -> list[RemovableHandle]:
        """Register the hooks a unit-replacing target needs on the unit's projections (nothing for the others);
        return their handles."""
        return []

    def on_input(self, host: Host, x: torch.Tensor) -> None:  # noqa: B027 (a no-op by default)
        """A unit-replacing target sees the unit's input (pre-hook of its input projections)."""

    def on_output(self, host: Host, output: torch.Tensor) -> torch.Tensor:
        """A unit-replacing target blends the unit's output (hook of its output projection)."""
        return output

    # ------------------------------------------------------------------------------------------ merging
    @abstractmethod
    def merge(self, layout: Layout, owner: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
        """The single projection the unit is once it has become this target."""

    def merged_bias(self, layout: Layout, owner: nn.Module) -> bool:
        """Whether :meth:`merge` gives the projection a bias."""
        return layout.projection_bias(owner)

    # ------------------------------------------------------------------------------------------ record
    @abstractmethod
    def record(self) -> dict[str, Any]:
        """The fields of an injected unit's checkpoint record that say this target (and its options)."""

    @classmethod
    @abstractmethod
    def from_record(cls, entry: Mapping[str, Any], layout: Layout) -> LinearTarget | None:
        """This target, when the record ``entry`` (of a unit with ``layout``) says it; else ``None``."""

    # ------------------------------------------------------------------------------------------ model cards
    @abstractmethod
    def describe(self) -> str:
        """What a unit collapsed towards this target has become (a phrase for model cards)."""
