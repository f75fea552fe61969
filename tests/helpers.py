"""What the tests share: tiny models built from configs (one per architecture of the grid) and small helpers that
make each test read as a comparison of numbers (outputs before and after, parameter counts measured on the modules).

Sizes are chosen so that every MLP is collapsible (intermediate size > d/2) and biases differ between architectures
(T5 has none, GPT-2 uses ``Conv1D``).
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, TrainingArguments

import hf_layercollapse as hlc
from hf_layercollapse.units import dummy_inputs

D, H, LAYERS, HEADS, VOCAB = 32, 64, 2, 4, 99

TEXT = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=H, max_position_embeddings=64)
VISION = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=H,
              image_size=16, patch_size=8, num_channels=3)

CONFIGS: dict[str, dict] = {
    "bert": TEXT,
    "roberta": TEXT,
    "electra": dict(TEXT, embedding_size=D),
    "distilbert": dict(vocab_size=VOCAB, dim=D, n_layers=LAYERS, n_heads=HEADS, hidden_dim=H,
                       max_position_embeddings=64),
    "gpt2": dict(bos_token_id=0, eos_token_id=0, vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                 n_inner=H, n_positions=64),
    "gpt_neo": dict(vocab_size=VOCAB, hidden_size=D, num_layers=LAYERS, num_heads=HEADS,
                    intermediate_size=H, max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                    window_size=8),
    "opt": dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                ffn_dim=H, max_position_embeddings=64, word_embed_proj_dim=D),
    "gpt_neox": dict(TEXT, rotary_pct=0.5),
    "bloom": dict(vocab_size=VOCAB, hidden_size=D, n_layer=LAYERS, n_head=HEADS),
    "falcon": dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   ffn_hidden_size=H, new_decoder_architecture=False, multi_query=True, bias=True),
    "phi": dict(TEXT),
    "vit": VISION,
    "deit": VISION,
    "clip": dict(text_config=dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=VOCAB, hidden_size=D,
                                  num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=H, max_position_embeddings=64),
                 vision_config=dict(VISION), projection_dim=16),
    "whisper": dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=3,
                    vocab_size=VOCAB, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
                    encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=H,
                    decoder_ffn_dim=H, num_mel_bins=8, max_source_positions=16, max_target_positions=32),
    "bart": dict(vocab_size=VOCAB, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
                 encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=H,
                 decoder_ffn_dim=H, max_position_embeddings=64),
    "t5": dict(vocab_size=VOCAB, d_model=D, d_kv=8, d_ff=H, num_layers=LAYERS, num_heads=HEADS,
               feed_forward_proj="relu"),
    # gated
    "llama": dict(TEXT, num_key_value_heads=HEADS),
    "mistral": dict(TEXT, num_key_value_heads=HEADS),
    "t5-gated": dict(vocab_size=VOCAB, d_model=D, d_kv=8, d_ff=H, num_layers=LAYERS, num_heads=HEADS,
                     feed_forward_proj="gated-gelu"),
}
PLAIN = [name for name in CONFIGS if name not in {"llama", "mistral", "t5-gated"}]
GATED = ["llama", "mistral", "t5-gated"]


def tiny_config(name: str):
    """The config of the tiny ``name`` model (``"t5-gated"`` is T5 with ``gated-gelu``)."""
    model_type = name.split("-")[0]
    return AutoConfig.for_model(model_type, **CONFIGS[name])


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny ``AutoModel`` of architecture ``name`` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return AutoModel.from_config(tiny_config(name)).eval()


#: Gated architectures of the gated tests: the three of the grid, and Qwen2, Gemma and Phi-3 (fused gate_up_proj).
GATED_ARCHS = ["llama", "mistral", "t5-gated", "qwen2", "gemma", "phi3"]
_GATED_EXTRA = {"qwen2": {}, "gemma": {"head_dim": 8}, "phi3": {"pad_token_id": 0}}


def gated_model(name: str, causal_lm: bool = False, seed: int = 0) -> torch.nn.Module:
    """A tiny gated model of :data:`GATED_ARCHS` (``AutoModel``, or ``AutoModelForCausalLM`` with ``causal_lm``)."""
    if name in GATED and not causal_lm:
        return tiny_model(name, seed)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(name, **TEXT, num_key_value_heads=HEADS, **_GATED_EXTRA.get(name, {}))
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    return auto.from_config(config).eval()


# ----------------------------------------------------------------------------------------------- helpers


def make_inputs(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """One small batch for ``model``: the library's dummy inputs with seeded random token ids / pixels."""
    inputs = dummy_inputs(model)
    generator = torch.Generator().manual_seed(seed)
    for key, value in inputs.items():
        if key == "input_ids":
            vocab = int(model.config.get_text_config().vocab_size)
            inputs[key] = torch.randint(3, vocab, value.shape, generator=generator)
        elif value.is_floating_point():
            inputs[key] = torch.randn(value.shape, generator=generator, dtype=value.dtype)
    return inputs


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every floating-point tensor of the model's output (hidden states, logits, caches...), in order."""
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert tensors, f"{type(model).__name__} returned no floating-point tensor"
    return tensors


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b), f"{len(a)} outputs vs {len(b)}"
    for x, y in zip(a, b):
        assert x.shape == y.shape, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a − b| / max |b| over each output tensor (relative to the tensor's scale, not element-wise)."""
    assert len(a) == len(b), f"{len(a)} outputs vs {len(b)}"
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
        scale = max(float(y.double().abs().max()), 1e-12)
        worst = max(worst, float((x.double() - y.double()).abs().max()) / scale)
    return worst


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def set_alphas(model: nn.Module, *values: float) -> dict[str, float]:
    """Set the α of the injected blocks in model order: one value for all, or one value per block."""
    acts = hlc.injected_activations(model)
    assert acts, "nothing injected"
    if len(values) == 1:
        values = values * len(acts)
    assert len(values) == len(acts), f"{len(values)} values for {len(acts)} blocks"
    with torch.no_grad():
        for act, value in zip(acts.values(), values):
            act.alpha.fill_(value)
    return {name: act.alpha_value for name, act in acts.items()}


def collapse_all(model: nn.Module, config: hlc.LayerCollapseConfig | None = None) -> hlc.CollapseReport:
    """Inject (every block by default), set every α to 1 and collapse."""
    hlc.get_collapse_model(model, config)
    set_alphas(model, 1.0)
    return hlc.collapse_model(model)


# ------------------------------------------------------------------- sizes of the tiny grid, from its configs

TWO_STACKS = {"clip", "whisper", "bart", "t5", "t5-gated"}  # encoder + decoder, or text + vision


def expected_blocks(name: str) -> int:
    """MLP blocks of ``tiny_model(name)``: 2 layers per stack."""
    return 4 if name in TWO_STACKS else 2


def hidden_size(name: str) -> int:
    """Intermediate size of ``tiny_model(name)``'s MLPs (BLOOM's is always 4·hidden_size)."""
    return 4 * D if name == "bloom" else H


def saved_per_block(d: int, h: int, bias: bool) -> int:
    """Parameters a plain d → h → d block loses when it becomes one d → d projection (computed from sizes)."""
    before = d * h + h * d + (h + d if bias else 0)
    after = d * d + (d if bias else 0)
    return before - after


def gated_params_saved(model: nn.Module) -> int:
    """Σ over gated blocks of (gate + up + down parameters) − (d·d + merged bias), from the modules themselves."""
    saved = 0
    for unit in hlc.find_mlp_blocks(model):
        owner = unit.owner(model)
        parts = {owner.get_submodule(p) for p in (*unit.layout.inputs, unit.layout.output)}
        before = sum(p.numel() for m in parts for p in m.parameters(recurse=False))
        down = owner.get_submodule(unit.layout.output)
        has_bias = any(m.bias is not None for m in parts)
        saved += before - (down.out_features * down.out_features + (down.out_features if has_bias else 0))
    return saved


# ------------------------------------------------------------------------------------------------------ PEFT


def random_lora(targets: list[str], **kwargs) -> LoraConfig:
    """LoRA whose B is not zero (init_lora_weights=False), so that it changes the outputs from the start."""
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def trainable_kinds(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count per kind: LoRA, α, gate constants, fully trained modules (modules_to_save), other
    (base)."""
    kinds = {"lora": 0, "alpha": 0, "gate_constant": 0, "saved_module": 0, "base": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = ("lora" if ".lora_" in name else "alpha" if "layercollapse_alpha" in name
                else "gate_constant" if "layercollapse_gate_constant" in name
                else "saved_module" if ".modules_to_save." in name else "base")
        kinds[kind] += param.numel()
    return kinds


def no_peft_left(model: nn.Module) -> bool:
    return not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")




def training_args(out, **kwargs) -> TrainingArguments:
    """Deterministic CPU ``TrainingArguments`` for tests (constant-LR SGD, no saving, logging every step)."""
    defaults = dict(max_steps=1, per_device_train_batch_size=16, optim="sgd", learning_rate=0.5,
                    lr_scheduler_type="constant", report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                    data_seed=0, use_cpu=True, logging_steps=1)
    return TrainingArguments(str(out), **{**defaults, **kwargs})
