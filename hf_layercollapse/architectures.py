"""Finding the MLP blocks of a model: a per-``model_type`` table, and a data-flow tracer for everything else."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

PROJECTIONS = (nn.Linear, Conv1D)


class BlockKind(str, Enum):
    """The kinds of MLP block. Only ``PLAIN`` blocks (``fc2(act(fc1(x)))``) collapse into one matrix today."""

    PLAIN = "plain"
    GATED = "gated"  # down(act(gate(x)) * up(x)): bilinear when act is linear; needs a constant gate.


@dataclass(frozen=True)
class Layout:
    """Where an MLP block's modules sit, relative to the block (the deepest module holding all of them).

    For gated blocks ``fc1`` is the up projection and ``gate`` the gate projection (``gate == fc1`` for a
    fused ``gate_up_proj``).
    """

    kind: BlockKind
    fc1: str
    act: str
    fc2: str
    dropouts: tuple[str, ...] = ()
    gate: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "fc1": self.fc1, "act": self.act, "fc2": self.fc2,
                "dropouts": list(self.dropouts), "gate": self.gate}

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        return cls(BlockKind(data["kind"]), data["fc1"], data["act"], data["fc2"], tuple(data.get("dropouts", ())),
                   data.get("gate"))


@dataclass(frozen=True)
class MLPBlock:
    """One MLP block found in a model: its name (relative to the model searched), index and layout."""

    name: str
    index: int
    layout: Layout

    @property
    def kind(self) -> BlockKind:
        return self.layout.kind

    def path(self, part: str) -> str:
        """Full module name of one of the block's parts (``"fc1"``, ``"act"``, ``"fc2"``, ``"gate"``)."""
        return join(self.name, getattr(self.layout, part))

    @property
    def module_names(self) -> tuple[str, ...]:
        parts = [self.path("fc1"), self.path("act"), self.path("fc2")]
        if self.layout.gate is not None:
            parts.append(self.path("gate"))
        return (self.name, *parts)


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _plain(fc1: str, act: str, fc2: str, *dropouts: str) -> Layout:
    return Layout(BlockKind.PLAIN, fc1, act, fc2, tuple(dropouts))


def _gated(gate: str, up: str, act: str, down: str, *dropouts: str) -> Layout:
    return Layout(BlockKind.GATED, up, act, down, tuple(dropouts), gate)


_BERT = _plain("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense")
_SEQ2SEQ = _plain("fc1", "activation_fn", "fc2")
_MLP_FC = _plain("fc1", "activation_fn", "fc2")
_NEOX = _plain("dense_h_to_4h", "act", "dense_4h_to_h")
_LLAMA = _gated("gate_proj", "up_proj", "act_fn", "down_proj")

#: Known layouts per ``model_type``. Anything else is found by :func:`trace_mlp_blocks`.
MLP_LAYOUTS: dict[str, tuple[Layout, ...]] = {
    **dict.fromkeys(("bert", "roberta", "electra", "camembert", "xlm-roberta", "ernie", "data2vec-text"),
                    (_BERT,)),
    "distilbert": (_plain("lin1", "activation", "lin2"),),
    "gpt2": (_plain("c_fc", "act", "c_proj"),),
    "gpt_neo": (_plain("c_fc", "act", "c_proj"),),
    "opt": (_SEQ2SEQ,),
    "gpt_neox": (_NEOX,),
    "falcon": (_NEOX,),
    "bloom": (_plain("dense_h_to_4h", "gelu_impl", "dense_4h_to_h"),),
    **dict.fromkeys(("phi", "vit", "deit", "clip", "siglip"), (_MLP_FC,)),
    **dict.fromkeys(("whisper", "bart", "mbart", "marian", "pegasus", "m2m_100"), (_SEQ2SEQ,)),
    **dict.fromkeys(("t5", "mt5", "umt5"), (_plain("wi", "act", "wo", "dropout"),
                                            _gated("wi_0", "wi_1", "act", "wo", "dropout"))),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "smollm3"),
                    (_LLAMA,)),
    "phi3": (_gated("gate_up_proj", "gate_up_proj", "activation_fn", "down_proj"),),
}


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or HF ``Conv1D`` (whose weight is ``[in, out]``)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _model_types(model: nn.Module) -> list[str]:
    """``model_type`` of the model's config and of its sub-configs (CLIP's text and vision configs)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    types = [config.model_type]
    for value in vars(config).values():
        if hasattr(value, "model_type") and hasattr(value, "to_dict"):
            types.append(value.model_type)
    return types


def _match_layout(owner: nn.Module, layout: Layout) -> bool:
    parts = {}
    for part in ("fc1", "act", "fc2", "gate"):
        rel = getattr(layout, part)
        if rel is None:
            continue
        try:
            parts[part] = owner.get_submodule(rel)
        except AttributeError:
            return False
    if not all(isinstance(parts[p], PROJECTIONS) for p in ("fc1", "fc2")) or isinstance(parts["act"], PROJECTIONS):
        return False
    hidden = projection_shape(parts["fc1"])[1]
    if layout.gate == layout.fc1:  # fused gate_up_proj: two halves
        hidden //= 2
    elif "gate" in parts and projection_shape(parts["gate"]) != projection_shape(parts["fc1"]):
        raise ValueError(
            f"Gated MLP block with gate {layout.gate!r} {projection_shape(parts['gate'])} and up projection "
            f"{layout.fc1!r} {projection_shape(parts['fc1'])} (in, out): their shapes disagree, so this is not a "
            "gated MLP LayerCollapse can handle."
        )
    return projection_shape(parts["fc2"])[0] == hidden


MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_not_moe(model: nn.Module) -> None:
    """Raise for mixture-of-experts models: their expert MLPs are not supported yet."""
    config = getattr(model, "config", None)
    configs = [config] + [v for v in vars(config).values() if hasattr(v, "model_type")] if config is not None else []
    for cfg in configs:
        for key in MOE_CONFIG_KEYS:
            if (getattr(cfg, key, None) or 0) > 1:
                raise ValueError(
                    f"{type(model).__name__} is a mixture-of-experts model ({key}={getattr(cfg, key)}): collapsing "
                    "expert MLPs is not supported yet. Its dense (non-expert) MLP blocks, if any, can be selected "
                    "with target_modules."
                )


def table_mlp_blocks(model: nn.Module) -> list[MLPBlock] | None:
    """MLP blocks found from :data:`MLP_LAYOUTS`, or ``None`` when the model's type is not in the table."""
    layouts = [layout for t in _model_types(model) for layout in MLP_LAYOUTS.get(t, ())]
    if not layouts:
        return None
    found = []
    for name, module in model.named_modules():
        for layout in dict.fromkeys(layouts):
            if _match_layout(module, layout):
                found.append(MLPBlock(name, len(found), layout))
                break
    return found


def find_mlp_blocks(
    model: nn.Module, example_inputs: dict[str, torch.Tensor] | None = None, method: str = "auto"
) -> list[MLPBlock]:
    """Every MLP block of ``model`` (plain and gated), in model order, with names relative to ``model``.

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
    blocks = table_mlp_blocks(model) if method != "trace" else None
    if method == "table" and blocks is None:
        raise ValueError(f"No MLP layout is known for model types {_model_types(model)}; use method='trace'.")
    if not blocks and method != "table":
        from .tracing import trace_mlp_blocks

        blocks = trace_mlp_blocks(model, example_inputs)
    return blocks


def _matches(name: str, key: str | list[str]) -> bool:
    if isinstance(key, str):
        return re.fullmatch(key, name) is not None
    return any(name == k or name.endswith("." + k) for k in key)


def _block_matches(block: MLPBlock, key: str | list[str]) -> bool:
    return any(_matches(name, key) for name in block.module_names)


def select_blocks(
    blocks: list[MLPBlock],
    target_modules: str | list[str] | None = None,
    exclude_modules: str | list[str] | None = None,
    layers_to_transform: int | list[int] | None = None,
) -> list[MLPBlock]:
    """The blocks a :class:`~hf_layercollapse.LayerCollapseConfig` selects; raises when a selector matches nothing."""
    selected = list(blocks)
    if layers_to_transform is not None:
        indices = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
        bad = [i for i in indices if not -len(blocks) <= i < len(blocks)]
        if bad:
            raise ValueError(
                f"layers_to_transform={layers_to_transform!r}: indices {bad} are out of range; the model has "
                f"{len(blocks)} MLP blocks (valid indices {-len(blocks)}..{len(blocks) - 1})."
            )
        wanted = {i % len(blocks) for i in indices}
        selected = [b for b in selected if b.index in wanted]
    if target_modules is not None:
        selected = [b for b in selected if _block_matches(b, target_modules)]
        if not selected:
            names = ", ".join(b.name for b in blocks[:4]) + (", ..." if len(blocks) > 4 else "")
            raise ValueError(
                f"target_modules={target_modules!r} matches none of the {len(blocks)} MLP blocks ({names}) or "
                "their modules; use a block name, a module name such as 'fc1' or a full-match regex."
            )
    if exclude_modules is not None:
        selected = [b for b in selected if not _block_matches(b, exclude_modules)]
    return selected

