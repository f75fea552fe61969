"""Tiny models built from configs, one per architecture of the test grid.

Each builder returns a randomly initialised model small enough to run a forward pass in milliseconds.
Sizes are chosen so that every MLP is collapsible (intermediate size > d/2) and biases differ between
architectures (T5 has none, GPT-2 uses ``Conv1D``).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

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
