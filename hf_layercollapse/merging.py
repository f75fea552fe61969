"""The exact algebra of a linear block: two projections with a linear map between them are one projection.

Computed in fp32 (or wider) and cast back to the output projection's dtype; the result is a ``Conv1D`` when the
output projection is one (GPT-2 family), else an ``nn.Linear``, with a bias when either projection has one.
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import as_linear, projection_from


def merge_projections(fc1: nn.Module, fc2: nn.Module,
                      line: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """The single projection equal to ``fc2(fc1(x))``: ``W = W2·W1``, ``b = W2·b1 + b2``; with
    ``line=(a, c)``, the one equal to ``fc2(a·fc1(x) + c)``: ``W = W2·diag(a)·W1``, ``b = W2·(a·b1 + c) + b2``.

    Example:
        >>> import torch
        >>> fc1, fc2 = torch.nn.Linear(4, 16), torch.nn.Linear(16, 3)
        >>> merged = merge_projections(fc1, fc2)
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(merged(x), fc2(fc1(x)), atol=1e-6)
        True
    """
    w1, b1 = as_linear(fc1)
    w2, b2 = as_linear(fc2)
    if line is not None:
        slope, offset = (t.detach().to(w1.device, w1.dtype).reshape(-1) for t in line)
        if slope.numel() != w1.shape[0] or offset.numel() != w1.shape[0]:
            raise ValueError(f"The line has {slope.numel()} slopes and {offset.numel()} offsets but the block has "
                             f"{w1.shape[0]} channels.")
        w1, b1 = slope[:, None] * w1, offset + (slope * b1 if b1 is not None else 0)
    return projection_from(fc2, w2 @ w1, _bias(w2, b1, b2))


def merge_gated(up: nn.Module | tuple[torch.Tensor, torch.Tensor | None], down: nn.Module,
                constant: torch.Tensor) -> nn.Module:
    """The single projection equal to ``down(c * up(x))``: ``W = W_down·diag(c)·W_up``,
    ``b = W_down·(c*b_up) + b_down``. ``up`` is a projection or its ``(weight [channels, in], bias)``.

    Example:
        >>> import torch
        >>> up, down, c = torch.nn.Linear(4, 16), torch.nn.Linear(16, 4), torch.randn(16)
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(merge_gated(up, down, c)(x), down(c * up(x)), atol=1e-6)
        True
    """
    w_up, b_up = up if isinstance(up, tuple) else as_linear(up)
    w_down, b_down = as_linear(down)
    c = constant.detach().to(w_up.device, w_up.dtype).reshape(-1)
    if c.numel() != w_up.shape[0]:
        raise ValueError(f"The gate constant has {c.numel()} values but the block has {w_up.shape[0]} channels.")
    return projection_from(down, w_down @ (c[:, None] * w_up), _bias(w_down, None if b_up is None else c * b_up,
                                                                         b_down))


def _bias(w2: torch.Tensor, b1: torch.Tensor | None, b2: torch.Tensor | None) -> torch.Tensor | None:
    if b1 is None and b2 is None:
        return None
    return (w2 @ b1 if b1 is not None else 0) + (b2 if b2 is not None else 0)
