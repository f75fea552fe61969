"""`CollapsibleActivation`: an MLP activation with a learnable pull towards the identity."""

from __future__ import annotations

import torch
from torch import nn

from .config import ACTIVATIONS


class CollapsibleActivation(nn.Module):
    """Wraps an MLP block's activation and adds one learnable scalar α (shape ``(1,)``).

    * ``mode="blend"``: ``α·x + (1−α)·act(x)``; α = 0 is exactly the wrapped activation.
    * ``mode="prelu"``: PReLU with slope α on the negative side (the paper's choice; replaces ``act``).

    On a gated MLP block (``down(act(gate(x)) * up(x))``) the module wraps the gate's activation and blends it
    towards a learnable constant ``c`` (``gate_constant``, one value per intermediate channel):
    ``(1−α)·act(g) + α·c``; at α = 1 the block is ``down(c * up(x))``, one affine map.

    A plain block may blend towards a fitted per-channel line instead of the identity (``line=(slope, offset)``,
    fixed buffers; ``LayerCollapseConfig(linear_target="fitted")``): ``(1−α)·act(z) + α·(slope·z + offset)``.

    In both modes α = 1 is linear (plain blocks), so the block around it becomes one affine map that
    :func:`hf_layercollapse.collapse_model` merges. ``alpha`` has shape ``(1,)`` because FSDP rejects 0-dim
    parameters. The regulariser term ``(1−α)²`` is computed inside ``forward`` (see
    :func:`hf_layercollapse.regularization_loss`), which keeps it correct under DDP, FSDP and ZeRO-3, where
    parameters must not be read outside the forward pass.

    Args:
        activation: The original activation module (kept, so ``mode="blend"`` and un-injecting are exact).
        mode: ``"blend"`` or ``"prelu"``.
        init_alpha: Initial value of α.
        gate_constant: Gated blocks: the initial ``c``.
        line: Plain blocks, ``mode="blend"``: ``(slope, offset)`` of the line blended towards (default: identity).

    Example:
        >>> import torch
        >>> from hf_layercollapse import CollapsibleActivation
        >>> act = CollapsibleActivation(torch.nn.GELU(), mode="blend", init_alpha=0.0)
        >>> x = torch.randn(4)
        >>> torch.equal(act(x), torch.nn.functional.gelu(x))
        True
        >>> _ = act.alpha.data.fill_(1.0)
        >>> torch.equal(act(x), x)
        True
    """

    #: Gated blocks: ``c`` was fitted by least squares (``linear_target="fitted"``), not set to the mean; a refit
    #: (:func:`~hf_layercollapse.refit_linear_targets`) follows the same rule. Recorded in the checkpoint's plan.
    fitted_gate: bool = False

    def __init__(self, activation: nn.Module, mode: str = "blend", init_alpha: float = 0.0,
                 gate_constant: torch.Tensor | None = None,
                 line: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        if mode not in ACTIVATIONS:
            raise ValueError(f"mode={mode!r} is not supported: use one of {ACTIVATIONS}.")
        if gate_constant is not None and mode != "blend":
            raise ValueError(f"mode={mode!r}: the gate of a gated MLP block can only be blended towards its constant "
                             "(mode='blend').")
        if line is not None and (mode != "blend" or gate_constant is not None):
            raise ValueError("line=(slope, offset) is the target of a plain block's blend (mode='blend').")
        self.activation = activation
        self.mode = mode
        self.alpha = nn.Parameter(torch.full((1,), float(init_alpha)))
        # gated blocks: act(gate(x)) is blended towards a learnable constant c, one value per intermediate channel
        self.gate_constant = None if gate_constant is None else nn.Parameter(gate_constant.detach().clone())
        # plain blocks with a fitted target: fixed per-channel line slope·z + offset (saved with the model)
        self.slope: torch.Tensor | None
        self.offset: torch.Tensor | None
        self.register_buffer("slope", None if line is None else line[0].detach().clone().reshape(-1))
        self.register_buffer("offset", None if line is None else line[1].detach().clone().reshape(-1))
        self._regularization_term: torch.Tensor | None = None
        self.last_alpha: torch.Tensor | None = None  # α seen by the latest forward (readable under FSDP)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        self._regularization_term = (1.0 - alpha).square().sum()
        self.last_alpha = alpha.detach().clone()
        alpha = alpha.to(hidden_states.dtype)
        if self.mode == "prelu":
            return torch.where(hidden_states >= 0, hidden_states, alpha * hidden_states)
        # torch.lerp(a, b, w) = a + w·(b − a) in one kernel, exactly a at w = 0 and exactly b at w = 1
        if self.gate_constant is not None:
            return torch.lerp(self.activation(hidden_states), self.gate_constant.to(hidden_states.dtype), alpha)
        if self.slope is not None:
            dtype = hidden_states.dtype
            target = torch.addcmul(self.offset.to(dtype), self.slope.to(dtype), hidden_states)
            return torch.lerp(self.activation(hidden_states), target, alpha)
        return torch.lerp(self.activation(hidden_states), hidden_states, alpha)

    def __getstate__(self) -> dict:
        # the term recorded by the last forward is part of an autograd graph: it is not state (deepcopy, pickle)
        state = dict(self.__dict__)
        state["_regularization_term"] = None
        state["last_alpha"] = None
        return state

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

    def extra_repr(self) -> str:
        extra = "" if self.gate_constant is None else f", gate_constant=[{self.gate_constant.numel()}]"
        extra += "" if self.slope is None else f", line=[{self.slope.numel()}]"
        return f"mode={self.mode!r}, alpha={self.alpha_value:.4f}{extra}"

    @property
    def line(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(slope, offset)`` of a plain block's fitted target, or None (the identity)."""
        return None if self.slope is None else (self.slope, self.offset)
