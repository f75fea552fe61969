"""Collapse units: the parts of a model that LayerCollapse can replace by one linear map.

A :class:`Unit` is a module of the model (its *owner*, by name) and a :class:`Layout` that says where the unit's
modules sit inside it and answers every structural question about them: which projections read the unit's input
and which one writes its output, the feature sizes, where statistics are tapped, what the unit costs before and
after merging, and how a merged projection is installed in its place. Each kind of unit is one ``Layout`` subclass,
registered by its ``kind``: :class:`PlainLayout` (``fc2(act(fc1(x)))``) and :class:`GatedLayout`
(``down(act(gate(x)) ⊙ up(x))``, with a fused ``gate_up_proj`` when ``gate == up``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import LayerCollapseConfigError
from ..modules import PROJECTIONS, join, projection_shape, set_module, submodule
from ..statistics import Dims


class BlockKind(str, Enum):
    """The kinds of unit."""

    PLAIN = "plain"  # fc2(act(fc1(x))): one matrix when act is linear
    GATED = "gated"  # down(act(gate(x)) * up(x)): bilinear when act is linear; one matrix with a constant gate
    SPAN = "span"  # consecutive decoder layers, replaced by a linear map fused into the layer before them


class Costs(NamedTuple):
    """Parameters and FLOPs per token (2 per multiply-add) of a unit's projections, before and after merging."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass(frozen=True)
class Tap:
    """Where a unit's tensor is read: the input (``post=False``) or output of the module at ``path``; ``half``: the
    second half of its last dimension (the up half of a fused ``gate_up_proj``)."""

    path: str
    post: bool
    half: bool = False

    def read(self, args: tuple, output: Any) -> torch.Tensor:
        tensor = output if self.post else args[0]
        if isinstance(tensor, (tuple, list)):  # a decoder layer that returns (hidden_states, ...)
            tensor = tensor[0]
        return tensor[..., tensor.shape[-1] // 2:] if self.half else tensor


_LAYOUTS: dict[str, type[Layout]] = {}


class Layout(ABC):
    """Where a unit's modules sit inside its owner, and what follows from that (see the module docstring)."""

    kind: ClassVar[BlockKind]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _LAYOUTS[cls.kind.value] = cls

    # ------------------------------------------------------------------------------------------ structure
    @property
    @abstractmethod
    def inputs(self) -> tuple[str, ...]:
        """The modules that read the unit's input ``x``."""

    @property
    @abstractmethod
    def output(self) -> str:
        """The module that writes the unit's output ``y``."""

    @property
    def input(self) -> str:
        """The first module that reads the unit's input (fc1; a gated block's up projection)."""
        return self.inputs[0]

    @property
    @abstractmethod
    def parts(self) -> tuple[str, ...]:
        """Every module path of the unit, without repeats."""

    @abstractmethod
    def dims(self, owner: nn.Module) -> Dims:
        """Feature sizes of the unit's taps."""

    @abstractmethod
    def taps(self) -> dict[str, Tap]:
        """Where each tap is read, in the order a forward pass reaches them."""

    @abstractmethod
    def check(self, owner: nn.Module) -> None:
        """Raise ``ValueError`` when ``owner`` does not hold a unit of this layout (missing module, wrong type or
        shape)."""

    def matches(self, owner: nn.Module) -> bool:
        """Whether ``owner`` holds a unit of this layout (structure and shapes). A unit that has this structure but
        cannot be handled (a gate and an up projection of different shapes) raises ``ValueError``."""
        try:
            self.check(owner)
        except (AttributeError, _Mismatch):
            return False
        return True

    def _modules(self, owner: nn.Module) -> dict[str, nn.Module]:
        missing = [p for p in self.parts if not _has(owner, p)]
        if missing:
            raise _Mismatch(f"no module {missing[0]!r}")
        return {p: owner.get_submodule(p) for p in self.parts}

    # ------------------------------------------------------------------------------------------ merging
    @abstractmethod
    def costs(self, owner: nn.Module, merged_bias: bool) -> Costs:
        """:class:`Costs` of replacing the unit by what it merges into (with a bias or not)."""

    @abstractmethod
    def install(self, owner: nn.Module, merged: nn.Module) -> None:
        """Put the merged projection in the unit's place."""

    # ------------------------------------------------------------------------------------------ record
    def to_dict(self) -> dict[str, Any]:
        """The layout as the checkpoint record stores it."""
        return {"kind": self.kind.value, **self._fields()}

    @abstractmethod
    def _fields(self) -> dict[str, Any]: ...

    @staticmethod
    def from_dict(data: Any, where: str = "the layout") -> Layout:
        """The layout of a record written by :meth:`to_dict`; a :class:`LayerCollapseConfigError` naming ``where``
        when it is malformed."""
        if not isinstance(data, dict):
            raise LayerCollapseConfigError(f"{where} must be a dict of module names, got {data!r}.")
        kind = data.get("kind")
        if kind not in _LAYOUTS:
            raise LayerCollapseConfigError(f"{where} has kind {kind!r}; known kinds are {sorted(_LAYOUTS)}.")
        try:
            return _LAYOUTS[kind]._from_fields(data)
        except (KeyError, TypeError, ValueError) as err:
            raise LayerCollapseConfigError(f"{where} ({kind}) is malformed: {err!r} in {data!r}.") from None

    @classmethod
    @abstractmethod
    def _from_fields(cls, data: dict[str, Any]) -> Layout: ...


class _Mismatch(ValueError):
    """The owner does not have this layout's structure."""


def _has(owner: nn.Module, path: str) -> bool:
    try:
        owner.get_submodule(path)
    except AttributeError:
        return False
    return True


def _names(data: dict[str, Any], *keys: str) -> list[str]:
    values = [data[k] for k in keys]
    bad = [k for k, v in zip(keys, values) if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"{bad[0]} must be a module name")
    return values


def _dropouts(data: dict[str, Any]) -> tuple[str, ...]:
    dropouts = data.get("dropouts", ())
    if not isinstance(dropouts, (list, tuple)) or not all(isinstance(d, str) for d in dropouts):
        raise ValueError("dropouts must be a list of module names")
    return tuple(dropouts)


def _check_mlp(owner: nn.Module, modules: dict[str, nn.Module], inputs: tuple[str, ...], act: str, output: str,
               hidden: int) -> None:
    not_projections = [p for p in (*inputs, output) if not isinstance(modules[p], PROJECTIONS)]
    if not_projections:
        raise _Mismatch(f"{not_projections[0]!r} is a {type(modules[not_projections[0]]).__name__}, not a projection")
    if isinstance(modules[act], PROJECTIONS):
        raise _Mismatch(f"the activation {act!r} is a projection")
    down_in = projection_shape(modules[output])[0]
    if down_in != hidden:
        raise _Mismatch(f"{output!r} reads {down_in} features but the activation has {hidden} channels")


class MLPLayout(Layout):
    """An MLP block: projections around one activation, merged into one ``d_in → d_out`` projection."""

    act: str
    dropouts: tuple[str, ...]

    @property
    def parts(self) -> tuple[str, ...]:
        """Every module path of the unit (projections and activation), without repeats."""
        return tuple(dict.fromkeys((*self.inputs, self.act, self.output)))

    @abstractmethod
    def channels(self, owner: nn.Module) -> int:
        """Intermediate channels (the activation's width)."""

    def dims(self, owner: nn.Module) -> Dims:
        d_in = projection_shape(owner.get_submodule(self.inputs[0]))[0]
        return Dims(d_in, self.channels(owner), projection_shape(owner.get_submodule(self.output))[1])

    def costs(self, owner: nn.Module, merged_bias: bool) -> Costs:
        projections = [owner.get_submodule(p) for p in dict.fromkeys((*self.inputs, self.output))]
        params = sum(p.numel() for m in projections for p in m.parameters(recurse=False))
        flops = sum(2 * projection_shape(m)[0] * projection_shape(m)[1] for m in projections)
        d_in, _, d_out = self.dims(owner)
        return Costs(params, d_in * d_out + (d_out if merged_bias else 0), flops, 2 * d_in * d_out)

    def projection_bias(self, owner: nn.Module) -> bool:
        """Whether the merged projection has a bias when the unit's own projections bring one (a ``Conv1D`` always
        has one)."""
        modules = [owner.get_submodule(p) for p in (self._bias_input, self.output)]
        return any(m.bias is not None for m in modules) or isinstance(modules[-1], Conv1D)

    @property
    @abstractmethod
    def _bias_input(self) -> str:
        """The input projection whose bias reaches the merged map (the gate's does not: the gate becomes constant)."""

    def install(self, owner: nn.Module, merged: nn.Module) -> None:
        """Put ``merged`` in the output projection's place and make the other modules pass ``x`` through to it (the
        call sites stay as they are, so any architecture keeps working)."""
        set_module(owner, self.output, merged)
        for name, module in self._pass_through().items():
            set_module(owner, name, module)
            # transformers re-initialises modules on loading; a parent whose own _init_weights reads the removed
            # projections (T5's wi/wo) must be skipped: the merged weights come from the checkpoint.
            submodule(owner, name.rpartition(".")[0])._is_hf_initialized = True

    @abstractmethod
    def _pass_through(self) -> dict[str, nn.Module]:
        """The modules that replace the unit's other modules once it is merged."""


@dataclass(frozen=True)
class PlainLayout(MLPLayout):
    """``fc2(act(fc1(x)))``, with dropouts in between (identities at evaluation)."""

    kind: ClassVar[BlockKind] = BlockKind.PLAIN
    fc1: str
    act: str
    fc2: str
    dropouts: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.fc1,)

    @property
    def output(self) -> str:
        return self.fc2

    @property
    def _bias_input(self) -> str:
        return self.fc1

    def channels(self, owner: nn.Module) -> int:
        return projection_shape(owner.get_submodule(self.fc1))[1]

    def taps(self) -> dict[str, Tap]:
        return {"x": Tap(self.fc1, post=False), "z": Tap(self.act, post=False), "g": Tap(self.act, post=True),
                "y": Tap(self.fc2, post=True)}

    def check(self, owner: nn.Module) -> None:
        modules = self._modules(owner)
        if isinstance(modules[self.fc1], PROJECTIONS):
            hidden = projection_shape(modules[self.fc1])[1]
        else:
            hidden = -1
        _check_mlp(owner, modules, (self.fc1,), self.act, self.fc2, hidden)

    def _pass_through(self) -> dict[str, nn.Module]:
        return {name: nn.Identity() for name in (self.fc1, self.act, *self.dropouts)}

    def _fields(self) -> dict[str, Any]:
        return {"fc1": self.fc1, "act": self.act, "fc2": self.fc2, "dropouts": list(self.dropouts), "gate": None}

    @classmethod
    def _from_fields(cls, data: dict[str, Any]) -> PlainLayout:
        if data.get("gate") is not None:
            raise ValueError("a plain block has no gate projection")
        return cls(*_names(data, "fc1", "act", "fc2"), _dropouts(data))


@dataclass(frozen=True)
class GatedLayout(MLPLayout):
    """``down(act(gate(x)) ⊙ up(x))``; ``gate == up`` is a fused ``gate_up_proj`` whose first half is the gate and
    second half the up projection (Phi-3)."""

    kind: ClassVar[BlockKind] = BlockKind.GATED
    gate: str
    up: str
    act: str
    down: str
    dropouts: tuple[str, ...] = ()

    @property
    def fused(self) -> bool:
        """One ``gate_up_proj`` computes both halves."""
        return self.gate == self.up

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.up, self.gate)))

    @property
    def output(self) -> str:
        return self.down

    @property
    def _bias_input(self) -> str:
        return self.up

    def channels(self, owner: nn.Module) -> int:
        return projection_shape(owner.get_submodule(self.up))[1] // (2 if self.fused else 1)

    def up_weight(self, owner: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[channels, d_in]`` weight and bias of the up projection (the up half of a fused one), fp32 or wider."""
        from ..modules import as_linear

        weight, bias = as_linear(owner.get_submodule(self.up))
        if self.fused:
            half = weight.shape[0] // 2
            weight, bias = weight[half:], None if bias is None else bias[half:]
        return weight, bias

    def taps(self) -> dict[str, Tap]:
        return {"x": Tap(self.up, post=False), "g": Tap(self.act, post=True),
                "u": Tap(self.up, post=True, half=self.fused), "y": Tap(self.down, post=True)}

    def check(self, owner: nn.Module) -> None:
        modules = self._modules(owner)
        up, gate = modules[self.up], modules[self.gate]
        if isinstance(up, PROJECTIONS) and isinstance(gate, PROJECTIONS) and not self.fused and (
                projection_shape(gate) != projection_shape(up)):
            raise ValueError(f"Gated MLP block with gate {self.gate!r} {projection_shape(gate)} and up projection "
                             f"{self.up!r} {projection_shape(up)} (in, out): their shapes disagree, so this is not a "
                             "gated MLP LayerCollapse can handle.")
        hidden = projection_shape(up)[1] // (2 if self.fused else 1) if isinstance(up, PROJECTIONS) else -1
        _check_mlp(owner, modules, self.inputs, self.act, self.down, hidden)

    def _pass_through(self) -> dict[str, nn.Module]:
        # the call site's act(gate(x)) * up(x) hands x to the merged projection: the projections become identities
        # (a fused one duplicates its input, so that both halves are x) and the activation returns ones
        modules: dict[str, nn.Module] = {name: nn.Identity() for name in (self.up, self.gate, *self.dropouts)}
        if self.fused:
            modules[self.up] = DuplicateInput()
        modules[self.act] = ConstantGate()
        return modules

    def _fields(self) -> dict[str, Any]:
        return {"fc1": self.up, "act": self.act, "fc2": self.down, "dropouts": list(self.dropouts), "gate": self.gate}

    @classmethod
    def _from_fields(cls, data: dict[str, Any]) -> GatedLayout:
        up, act, down, gate = _names(data, "fc1", "act", "fc2", "gate")
        return cls(gate, up, act, down, _dropouts(data))


class ConstantGate(nn.Module):
    """Stands in for the activation of a merged gated block: the gate is constant and lives in the merged projection,
    so this returns ones (``ones * up(x)`` leaves ``x`` to the merged projection)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(hidden_states)


class DuplicateInput(nn.Module):
    """Stands in for the fused ``gate_up_proj`` of a merged gated block: ``[x, x]``, so that both halves are ``x``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.cat([hidden_states, hidden_states], dim=-1)


@dataclass(frozen=True)
class Unit:
    """One collapse unit of a model: its owner's name (relative to the model searched), its index among the units
    found, and its layout."""

    name: str
    index: int
    layout: Layout

    @property
    def kind(self) -> BlockKind:
        return self.layout.kind

    def owner(self, model: nn.Module) -> nn.Module:
        """The module holding the unit."""
        return submodule(model, self.name)

    def path(self, part: str) -> str:
        """Full name (relative to the model) of one of the unit's modules, by its role in the layout (``"fc1"``,
        ``"act"``, ``"fc2"``; ``"gate"``, ``"up"``, ``"act"``, ``"down"``; ``"input"`` and ``"output"`` for either
        kind)."""
        return join(self.name, getattr(self.layout, part))

    @property
    def module_names(self) -> tuple[str, ...]:
        """The unit's own name and the full names of its modules (what selectors match)."""
        return (self.name, *(join(self.name, part) for part in self.layout.parts))


#: The name of the units in the public API of earlier versions.
MLPBlock = Unit


@contextmanager
def replaced_units(model: nn.Module, replacements: dict[Unit, Callable[[torch.Tensor], torch.Tensor]]
                   ) -> Iterator[None]:
    """Temporarily compute each unit as ``replacement(x)`` of its input ``x`` (hooks; the model is unchanged)."""
    handles = []
    for unit, replacement in replacements.items():
        owner, layout = unit.owner(model), unit.layout
        stash: dict[str, torch.Tensor] = {}
        handles.append(owner.get_submodule(layout.inputs[0]).register_forward_pre_hook(
            lambda m, args, s=stash: s.__setitem__("x", args[0])))
        handles.append(owner.get_submodule(layout.output).register_forward_hook(
            lambda m, args, out, s=stash, f=replacement: f(s["x"]).to(out.dtype)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
