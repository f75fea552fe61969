"""`CollapsibleActivation`: an MLP activation with a learnable pull towards the identity."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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

    Any block, plain or gated, may instead blend its whole output towards an affine map of its input
    (``affine=(weight, bias)``, learnable ``affine_weight`` ``[out, in]`` and ``affine_bias``;
    ``LayerCollapseConfig(linear_target="affine")``): the block computes ``(1−α)·block(x) + α·(weight·x + bias)``,
    and at α = 1 it is that map. The activation itself is then left as it is: ``forward`` computes the map of the
    block input ``x`` (seen by a hook on the input and gate projections) and a hook on the output projection blends
    it in (:meth:`attach` registers the hooks), so the map's parameters, like α, are only read inside ``forward``.

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
        affine: ``mode="blend"``: ``(weight [out, in], bias [out])``, the initial affine map the block's output is
            blended towards (call :meth:`attach` with the block's projections).

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
                 line: tuple[torch.Tensor, torch.Tensor] | None = None,
                 affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        if mode not in ACTIVATIONS:
            raise ValueError(f"mode={mode!r} is not supported: use one of {ACTIVATIONS}.")
        if gate_constant is not None and mode != "blend":
            raise ValueError(f"mode={mode!r}: the gate of a gated MLP block can only be blended towards its constant "
                             "(mode='blend').")
        if line is not None and (mode != "blend" or gate_constant is not None):
            raise ValueError("line=(slope, offset) is the target of a plain block's blend (mode='blend').")
        if affine is not None and (mode != "blend" or gate_constant is not None or line is not None):
            raise ValueError("affine=(weight, bias) is the target of a block's blend (mode='blend'), instead of a "
                             "line or a gate constant.")
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
        # any block with an affine target: the block's output is blended towards weight·x + bias (learnable)
        self.affine_weight = None if affine is None else nn.Parameter(affine[0].detach().clone())
        self.affine_bias = None if affine is None else nn.Parameter(affine[1].detach().clone().reshape(-1))
        self._block_input: torch.Tensor | None = None  # the block input x seen by the input projection's hook
        self._affine_target: tuple[torch.Tensor, torch.Tensor] | None = None  # (W·x + b, α) for the output hook
        self._regularization_term: torch.Tensor | None = None
        self.last_alpha: torch.Tensor | None = None  # α seen by the latest forward (readable under FSDP)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        self._regularization_term = (1.0 - alpha).square().sum()
        self.last_alpha = alpha.detach().clone()
        alpha = alpha.to(hidden_states.dtype)
        if self.mode == "prelu":
            return torch.where(hidden_states >= 0, hidden_states, alpha * hidden_states)
        if self.affine_weight is not None:  # the map is blended into the block's output by _blend_output
            x, self._block_input = self._block_input, None
            if x is None:
                raise RuntimeError(f"{self._where()}: the activation ran before the block's input projection, so the "
                                   "affine target has no input; use linear_target='fitted' for this architecture.")
            dtype = hidden_states.dtype
            target = F.linear(x.to(dtype), self.affine_weight.to(dtype), self.affine_bias.to(dtype))
            self._affine_target = (target, alpha)
            return self.activation(hidden_states)
        # torch.lerp(a, b, w) = a + w·(b − a) in one kernel, exactly a at w = 0 and exactly b at w = 1
        if self.gate_constant is not None:
            return torch.lerp(self.activation(hidden_states), self.gate_constant.to(hidden_states.dtype), alpha)
        if self.slope is not None:
            dtype = hidden_states.dtype
            target = torch.addcmul(self.offset.to(dtype), self.slope.to(dtype), hidden_states)
            return torch.lerp(self.activation(hidden_states), target, alpha)
        return torch.lerp(self.activation(hidden_states), hidden_states, alpha)

    def attach(self, input_projection: nn.Module, output_projection: nn.Module,
               gate_projection: nn.Module | None = None) -> None:
        """Affine targets: hook the block's input projection and a gated block's gate projection (to see ``x``, for
        ``forward``) and its output projection (to blend its output towards ``affine_weight·x + affine_bias``). The
        hooks are bound methods of this module, so a ``deepcopy`` of the model keeps them pointing at the copy's
        activation; collapsing replaces the projections (and the hooks).

        Example:
            >>> import torch
            >>> from hf_layercollapse import CollapsibleActivation
            >>> fc1, fc2 = torch.nn.Linear(4, 16), torch.nn.Linear(16, 4)
            >>> x = torch.randn(2, 4)
            >>> block = fc2(torch.nn.functional.gelu(fc1(x)))
            >>> act = CollapsibleActivation(torch.nn.GELU(), affine=(torch.eye(4), torch.zeros(4)))
            >>> act.attach(fc1, fc2)
            >>> torch.equal(fc2(act(fc1(x))), block)  # α = 0: the block
            True
            >>> _ = act.alpha.data.fill_(1.0)
            >>> torch.equal(fc2(act(fc1(x))), x)  # α = 1: the map, here the identity
            True
        """
        if self.affine_weight is None:
            raise ValueError("attach() is for activations with an affine target (affine=(weight, bias)).")
        inputs = [input_projection] + ([gate_projection] if gate_projection not in (None, input_projection) else [])
        for projection in inputs:  # a gated block may run act(gate(x)) before up(x): x is seen by both
            projection.register_forward_pre_hook(self._stash_input)
        output_projection.register_forward_hook(self._blend_output)

    def _where(self) -> str:
        layout = getattr(self, "layout", None)
        return (f"Block with an affine target ({layout.fc1} -> {layout.act} -> {layout.fc2})" if layout is not None
                else "Block with an affine target")

    def _stash_input(self, module: nn.Module, args: tuple) -> None:
        self._block_input = args[0]

    def _blend_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        computed, self._affine_target, self._block_input = self._affine_target, None, None
        if computed is None:
            raise RuntimeError(f"{self._where()}: the output projection ran without the activation before it, so "
                               "there is no affine target to blend in; use linear_target='fitted' for this "
                               "architecture.")
        target, alpha = computed
        return torch.lerp(output, target.to(output.dtype), alpha.to(output.dtype))

    @property
    def affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(weight [out, in], bias)`` of the affine map the block's output is blended towards, or None."""
        return None if self.affine_weight is None else (self.affine_weight, self.affine_bias)

    def target_parameters(self) -> list[nn.Parameter]:
        """The learnable linear target besides α: a gated block's ``c`` or an affine target's weight and bias."""
        params = [self.gate_constant, self.affine_weight, self.affine_bias]
        return [p for p in params if p is not None]

    def __getstate__(self) -> dict:
        # the term recorded by the last forward is part of an autograd graph: it is not state (deepcopy, pickle)
        state = dict(self.__dict__)
        state["_regularization_term"] = None
        state["last_alpha"] = None
        state["_block_input"] = None
        state["_affine_target"] = None
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
        extra += "" if self.affine_weight is None else f", affine={list(self.affine_weight.shape)}"
        return f"mode={self.mode!r}, alpha={self.alpha_value:.4f}{extra}"

    @property
    def line(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(slope, offset)`` of a plain block's fitted target, or None (the identity)."""
        return None if self.slope is None else (self.slope, self.offset)
