"""Units found from a per-``model_type`` table of MLP layouts (the tracer finds them in everything else)."""

from __future__ import annotations

from torch import nn

from .layout import GatedLayout, Layout, PlainLayout, Unit

_BERT = PlainLayout("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense")
_FC = PlainLayout("fc1", "activation_fn", "fc2")
_NEOX = PlainLayout("dense_h_to_4h", "act", "dense_4h_to_h")
_LLAMA = GatedLayout("gate_proj", "up_proj", "act_fn", "down_proj")

#: Known layouts per ``model_type``. Anything else is found by the tracer.
MLP_LAYOUTS: dict[str, tuple[Layout, ...]] = {
    **dict.fromkeys(("bert", "roberta", "electra", "camembert", "xlm-roberta", "ernie", "data2vec-text"),
                    (_BERT,)),
    "distilbert": (PlainLayout("lin1", "activation", "lin2"),),
    "gpt2": (PlainLayout("c_fc", "act", "c_proj"),),
    "gpt_neo": (PlainLayout("c_fc", "act", "c_proj"),),
    "opt": (_FC,),
    "gpt_neox": (_NEOX,),
    "falcon": (_NEOX,),
    "bloom": (PlainLayout("dense_h_to_4h", "gelu_impl", "dense_4h_to_h"),),
    **dict.fromkeys(("phi", "vit", "deit", "clip", "siglip"), (_FC,)),
    **dict.fromkeys(("whisper", "bart", "mbart", "marian", "pegasus", "m2m_100"), (_FC,)),
    **dict.fromkeys(("t5", "mt5", "umt5"), (PlainLayout("wi", "act", "wo", ("dropout",)),
                                            GatedLayout("wi_0", "wi_1", "act", "wo", ("dropout",)))),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "smollm3"),
                    (_LLAMA,)),
    "phi3": (GatedLayout("gate_up_proj", "gate_up_proj", "activation_fn", "down_proj"),),
}

MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def sub_configs(model: nn.Module) -> list:
    """The model's config and its sub-configs (CLIP's text and vision configs), or ``[]`` without a config."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    return [config] + [v for v in vars(config).values() if hasattr(v, "model_type") and hasattr(v, "to_dict")]


def model_types(model: nn.Module) -> list[str]:
    """``model_type`` of the model's config and of its sub-configs."""
    return [config.model_type for config in sub_configs(model)]


def check_not_moe(model: nn.Module) -> None:
    """Raise for mixture-of-experts models: their expert MLPs are not supported yet."""
    for config in sub_configs(model):
        for key in MOE_CONFIG_KEYS:
            if (getattr(config, key, None) or 0) > 1:
                raise ValueError(
                    f"{type(model).__name__} is a mixture-of-experts model ({key}={getattr(config, key)}): collapsing "
                    "expert MLPs is not supported yet. Its dense (non-expert) MLP blocks, if any, can be selected "
                    "with target_modules."
                )


def table_units(model: nn.Module) -> list[Unit] | None:
    """Units found from :data:`MLP_LAYOUTS`, or ``None`` when the model's type is not in the table."""
    layouts = list(dict.fromkeys(layout for t in model_types(model) for layout in MLP_LAYOUTS.get(t, ())))
    if not layouts:
        return None
    found: list[Unit] = []
    for name, module in model.named_modules():
        layout = next((layout for layout in layouts if layout.matches(module)), None)
        if layout is not None:
            found.append(Unit(name, len(found), layout))
    return found
