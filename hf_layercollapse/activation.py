"""The module that makes a unit collapsible: α and a linear target, in the place of the unit's activation.

:class:`CollapsibleModule` holds what every host of an injected unit shares — the regulariser term ``(1−α)²``
computed inside ``forward`` (so that it stays correct under DDP, FSDP and ZeRO-3, where parameters must not be read
outside the forward pass), α as seen by the last forward, and the dispatch to the target. :class:`CollapsibleActivation`
is the host of :func:`~hf_layercollapse.get_collapse_model` and of checkpoints (one α, one target); the PEFT layer
(:class:`~hf_layercollapse.peft.LayerCollapseLayer`) is the host with one α and one target per adapter.
:func:`inject_unit` is the one builder of an injected unit, for injection and loading alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .modules import WrappedActivation, out_of_place, set_module
from .targets import Identity, LinearTarget
from .units import Layout, Unit


class CollapsibleModule(WrappedActivation):
    """Base of the modules that host an injected unit (see the module docstring).

    Subclasses provide ``alpha`` (shape ``(1,)``: FSDP rejects 0-dim parameters), ``target``,
    :meth:`target_tensors` and ``activation`` (the original activation).
    """

    layout: Layout | None = None
    alpha: torch.Tensor
    target: LinearTarget

    def _init_state(self) -> None:
        self._regularization_term: torch.Tensor | None = None
        self.last_alpha: torch.Tensor | None = None  # α seen by the latest forward (readable under FSDP)
        self._unit_input: torch.Tensor | None = None  # unit-replacing targets: x, seen by the input projections
        self._unit_output: tuple[torch.Tensor, torch.Tensor] | None = None  # (target output, α) for the output hook

    def target_tensors(self) -> dict[str, torch.Tensor]:
        """The target's tensors, by name (``gate_constant``, ``slope``/``offset``, ``affine_weight``/``_bias``)."""
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        self._regularization_term = (1.0 - alpha).square().sum()
        self.last_alpha = alpha.detach().clone()
        return self.target.blend(self, hidden_states, alpha.to(hidden_states.dtype))

    def _see_input(self, module: nn.Module, args: tuple) -> None:
        self.target.on_input(self, args[0])

    def _blend_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.target.on_output(self, output)

    def where(self) -> str:
        """The unit, for error messages."""
        layout = self.layout
        return f"Block {' -> '.join(layout.parts)}" if layout is not None else "Block"

    def target_parameters(self) -> list[torch.Tensor]:
        """The learnable tensors of the target besides α (a gated block's ``c``, an affine map or its low-rank
        correction)."""
        tensors = self.target_tensors()
        return [tensors[name] for name in self.target.trainable_names]

    def regularization_term(self) -> torch.Tensor:
        """``(1−α)²``: the term recorded by the latest forward pass (consumed), else computed from α now.

        A term recorded by a forward pass under ``torch.no_grad()`` (evaluation) carries no gradient: when a
        gradient is wanted now, the term is computed from α instead, so that it always reaches α.
        """
        term, self._regularization_term = self._regularization_term, None
        stale = term is not None and not term.requires_grad and torch.is_grad_enabled() and self.alpha.requires_grad
        if term is None or stale:
            term = (1.0 - self.alpha).square().sum()
        return term

    @property
    def alpha_value(self) -> float:
        """α as a Python float."""
        return float(self.alpha.detach().float().reshape(-1)[0])

    def __getstate__(self) -> dict:
        # what the last forward recorded is part of an autograd graph: it is not state (deepcopy, pickle)
        state = dict(self.__dict__)
        state.update(_regularization_term=None, last_alpha=None, _unit_input=None, _unit_output=None)
        return state


class CollapsibleActivation(CollapsibleModule):
    """Wraps a unit's activation with one learnable α (shape ``(1,)``) and a :class:`~hf_layercollapse.targets.
    LinearTarget`: the unit computes ``(1−α)·(original) + α·(target)`` (the PReLU target: the paper's PReLU of slope
    α), so α = 0 is exactly the original unit and α = 1 is linear, merged by :func:`~hf_layercollapse.collapse_model`.

    Args:
        activation: The original activation module (kept, so the blend and un-injecting are exact).
        target: What the unit becomes at α = 1 (default: the identity, for a plain block).
        init_alpha: Initial value of α.
        tensors: The target's initial tensors by name (see ``target.tensor_names``); learnable parameters when the
            target trains them, fixed buffers otherwise. Saved with the model.
        layout: The unit's layout (needed by targets that replace the whole unit: :func:`inject_unit` sets it).

    Example:
        >>> import torch
        >>> from hf_layercollapse import CollapsibleActivation
        >>> act = CollapsibleActivation(torch.nn.GELU(), init_alpha=0.0)
        >>> x = torch.randn(4)
        >>> torch.equal(act(x), torch.nn.functional.gelu(x))
        True
        >>> _ = act.alpha.data.fill_(1.0)
        >>> torch.equal(act(x), x)
        True
    """

    def __init__(self, activation: nn.Module, target: LinearTarget | None = None, init_alpha: float = 0.0,
                 tensors: Mapping[str, torch.Tensor] | None = None, layout: Layout | None = None) -> None:
        super().__init__()
        self.activation = out_of_place(activation)
        self.target = target if target is not None else Identity()
        self.layout = layout
        self.alpha = nn.Parameter(torch.full((1,), float(init_alpha)))
        tensors = dict(tensors or {})
        if set(tensors) != set(self.target.tensor_names):
            raise ValueError(f"The {self.target.name} target needs the tensors {list(self.target.tensor_names)}, got "
                             f"{sorted(tensors)}.")
        for name in self.target.tensor_names:
            value = tensors[name].detach().clone()
            if self.target.trainable_tensor(name):
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self._init_state()

    def target_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.target.tensor_names}

    @property
    def mode(self) -> str:
        """``"prelu"`` for the paper's PReLU, else ``"blend"``."""
        return self.target.record()["mode"]

    def extra_repr(self) -> str:
        shapes = "".join(f", {name}={list(t.shape)}" for name, t in self.target_tensors().items())
        return f"target={self.target.name!r}, alpha={self.alpha_value:.4f}{shapes}"


def injected_activations(model: nn.Module) -> dict[str, CollapsibleModule]:
    """Every injected unit's host module in ``model`` (:class:`CollapsibleActivation` or a PEFT LayerCollapse layer),
    keyed by the unit's name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, CollapsibleModule):
            act = module.layout.act
            owner = name[: -len(act) - 1] if name.endswith("." + act) else ("" if name == act else name)
            found[owner] = module
    return found


def inject_unit(model: nn.Module, unit: Unit, target: LinearTarget, tensors: Mapping[str, torch.Tensor],
                init_alpha: float = 0.0) -> CollapsibleActivation:
    """Wrap ``unit``'s activation in ``model`` by a :class:`CollapsibleActivation` towards ``target`` with ``tensors``
    (on the unit's device and dtype), install it and attach the target's hooks; return it."""
    owner, layout = unit.owner(model), unit.layout
    weight = owner.get_submodule(layout.output).weight
    host = CollapsibleActivation(owner.get_submodule(layout.act), target, init_alpha, tensors, layout)
    host.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
    set_module(owner, layout.act, host)
    target.attach(host, owner, layout)
    return host
