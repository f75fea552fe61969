"""Small helpers on PyTorch modules that every layer of the library uses: projections (``nn.Linear`` and the GPT-2
family's ``Conv1D``), building a projection from a matrix, and finding or replacing submodules by name."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

#: The projection types a unit may be made of.
PROJECTIONS = (nn.Linear, Conv1D)


class WrappedActivation(nn.Module):
    """Base of the modules this library puts in an activation's place (they keep the original as ``.activation``);
    the block tracer treats one as the activation it wraps."""

    activation: nn.Module


def out_of_place(activation: nn.Module) -> nn.Module:
    """``activation`` with ``inplace=True`` turned off in it and its children (``nn.ReLU(inplace=True)``): a blend
    reads the activation's input after the activation ran, which an in-place activation has overwritten. The
    activation computes the same values; only its memory use changes."""
    for module in activation.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return activation


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or HF ``Conv1D`` (whose weight is ``[in, out]``)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` or ``Conv1D`` (a view, in the module's dtype)."""
    if not module.weight.is_floating_point():
        raise ValueError(f"{type(module).__name__} has quantised weights: fit on a floating-point copy of the model.")
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def as_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight as ``[out, in]`` and bias of an ``nn.Linear`` or ``Conv1D``, detached, in at least fp32."""
    dtype = torch.promote_types(module.weight.dtype, torch.float32)
    weight = linear_weight(module).detach().to(dtype)
    bias = None if module.bias is None else module.bias.detach().to(dtype)
    return weight, bias


def empty_projection(like: nn.Module, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """An uninitialised projection of the same family, dtype and device as ``like``. It is built on the meta device:
    no initialiser runs, so merging leaves the global random state (and a training run's dropout masks) alone."""
    with torch.device("meta"):
        if isinstance(like, Conv1D):
            module = Conv1D(out_features, in_features).to(dtype=like.weight.dtype)
        else:
            module = nn.Linear(in_features, out_features, bias=bias, dtype=like.weight.dtype)
    return module.to_empty(device=like.weight.device)


def projection_from(like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A projection of ``like``'s family, dtype and device holding ``weight`` (``[out, in]``) and ``bias``.

    Example:
        >>> import torch
        >>> merged = projection_from(torch.nn.Linear(4, 3), torch.eye(2), None)
        >>> merged, torch.equal(merged(torch.ones(2)), torch.ones(2))
        (Linear(in_features=2, out_features=2, bias=False), True)
    """
    merged = empty_projection(like, weight.shape[1], weight.shape[0], bias is not None)
    with torch.no_grad():
        merged.weight.copy_(weight.t() if isinstance(merged, Conv1D) else weight)
        if bias is not None:
            merged.bias.copy_(bias)
        elif merged.bias is not None:  # a Conv1D always has a bias: the map has none, so it is zero
            merged.bias.zero_()
    return merged


def join(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` when the prefix is empty."""
    return f"{prefix}.{name}" if prefix else name


def submodule(root: nn.Module, name: str) -> nn.Module:
    """``root.get_submodule(name)``; ``root`` itself for ``""``."""
    return root.get_submodule(name) if name else root


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` of ``root`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(submodule(root, parent_name), child, module)


def base_prefix(model: nn.Module) -> str:
    """Name of the base model inside ``model`` (``"bert"`` for ``BertForSequenceClassification``), or ``""``."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    return next((name for name, module in model.named_modules() if module is base), "")


def module_order(model: nn.Module) -> dict[str, int]:
    """Position of every module name in ``model.named_modules()`` (to sort names in model order)."""
    return {name: i for i, (name, _) in enumerate(model.named_modules())}
