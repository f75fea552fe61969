"""Collapse units: what can collapse in a model, how it is laid out, and how it is found (a per-``model_type`` table,
else a data-flow tracer) and selected."""

from __future__ import annotations

import re

import torch
from torch import nn

from .decoder import Cut, DecoderStack, SpanLayout, cut_layers, decoder_stack
from .layout import (
    BlockKind,
    ConstantGate,
    Costs,
    DuplicateInput,
    GatedLayout,
    Layout,
    MLPBlock,
    MLPLayout,
    PlainLayout,
    Tap,
    Unit,
    replaced_units,
)
from .table import MLP_LAYOUTS, check_not_moe, model_types, table_units
from .tracing import dummy_inputs, trace_units

__all__ = [
    "MLP_LAYOUTS",
    "BlockKind",
    "ConstantGate",
    "Costs",
    "Cut",
    "DecoderStack",
    "DuplicateInput",
    "GatedLayout",
    "Layout",
    "MLPBlock",
    "MLPLayout",
    "PlainLayout",
    "SpanLayout",
    "Tap",
    "Unit",
    "check_not_moe",
    "cut_layers",
    "decoder_stack",
    "dummy_inputs",
    "find_mlp_blocks",
    "replaced_units",
    "select_units",
    "table_units",
    "trace_units",
]


def find_mlp_blocks(
    model: nn.Module, example_inputs: dict[str, torch.Tensor] | None = None, method: str = "auto"
) -> list[Unit]:
    """Every MLP block of ``model`` (plain and gated) as a :class:`Unit`, in model order, with names relative to
    ``model``.

    Args:
        model: Any PyTorch module, typically a ``transformers`` model.
        example_inputs: Inputs for one forward pass, used by the tracer when the model type is not in
            :data:`MLP_LAYOUTS` (default: dummy inputs built from the model's config).
        method: ``"auto"`` (table, else tracer), ``"table"`` or ``"trace"``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from hf_layercollapse import find_mlp_blocks
        >>> config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        >>> [block.name for block in find_mlp_blocks(BertModel(config))]
        ['encoder.layer.0', 'encoder.layer.1']
    """
    if method not in ("auto", "table", "trace"):
        raise ValueError(f"method={method!r}: use 'auto', 'table' or 'trace'.")
    units = table_units(model) if method != "trace" else None
    if method == "table" and units is None:
        raise ValueError(f"No MLP layout is known for model types {model_types(model)}; use method='trace'.")
    if not units and method != "table":
        units = trace_units(model, example_inputs)
    return units


def _matches(name: str, key: str | list[str]) -> bool:
    if isinstance(key, str):
        return re.fullmatch(key, name) is not None
    return any(name == k or name.endswith("." + k) for k in key)


def _unit_matches(unit: Unit, key: str | list[str]) -> bool:
    return any(_matches(name, key) for name in unit.module_names)


def select_units(
    units: list[Unit],
    target_modules: str | list[str] | None = None,
    exclude_modules: str | list[str] | None = None,
    layers_to_transform: int | list[int] | None = None,
) -> list[Unit]:
    """The units a config's selectors choose (PEFT's matching rules, see
    :class:`~hf_layercollapse.LayerCollapseConfig`); raises when ``target_modules`` matches nothing."""
    selected = list(units)
    if layers_to_transform is not None:
        indices = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
        bad = [i for i in indices if not -len(units) <= i < len(units)]
        if bad:
            raise ValueError(
                f"layers_to_transform={layers_to_transform!r}: indices {bad} are out of range; the model has "
                f"{len(units)} MLP blocks (valid indices {-len(units)}..{len(units) - 1})."
            )
        wanted = {i % len(units) for i in indices}
        selected = [u for u in selected if u.index in wanted]
    if target_modules is not None:
        selected = [u for u in selected if _unit_matches(u, target_modules)]
        if not selected:
            names = ", ".join(u.name for u in units[:4]) + (", ..." if len(units) > 4 else "")
            raise ValueError(
                f"target_modules={target_modules!r} matches none of the {len(units)} MLP blocks ({names}) or "
                "their modules; use a block name, a module name such as 'fc1' or a full-match regex."
            )
    if exclude_modules is not None:
        selected = [u for u in selected if not _unit_matches(u, exclude_modules)]
    return selected
