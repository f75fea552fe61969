"""Spans of decoder layers (``hf_layercollapse.units.decoder``): the fused-map algebra against the unfused model on
tiny Llama, Mistral, Qwen2 and Gemma; cuts renumber the layers and leave a stock checkpoint that plain transformers
loads (in a process without this library) and generates from; the layouts spans refuse."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import HEADS, TEXT
from transformers import AutoConfig, AutoModelForCausalLM

import hf_layercollapse as hlc
from hf_layercollapse.units import Cut, SpanLayout, cut_layers, decoder_stack

ARCHS = {"llama": {}, "mistral": {}, "qwen2": {}, "gemma": {"head_dim": 8}}


def decoder(name: str, layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(name, **{**TEXT, "num_hidden_layers": layers}, num_key_value_heads=HEADS,
                                  **ARCHS.get(name, {}))
    return AutoModelForCausalLM.from_config(config).eval()


def stack_of(model):
    return decoder_stack(model, hlc.find_mlp_blocks(model))


def unfused_logits(model, ids, start: int, length: int, transform: torch.Tensor | None) -> torch.Tensor:
    """The original model with the span's layers made identities and layer start−1's MLP output times T (hooks)."""
    stack = stack_of(model)
    layers = stack.layers(model)
    handles = []
    if transform is not None:
        handles.append(layers[start - 1].get_submodule(stack.fuse).register_forward_hook(
            lambda m, a, out: out @ transform.to(out.dtype)))
    for i in range(start, start + length):
        handles.append(layers[i].register_forward_hook(
            lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("fused", [True, False], ids=["fused_map", "cut"])
def test_fused_map_and_cut_equal_the_unfused_model(name, fused):
    model = decoder(name)
    ids = torch.randint(1, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    transform = torch.eye(32) + 0.1 * torch.randn(32, 32, generator=torch.Generator().manual_seed(2)) if fused else None
    expected = unfused_logits(model, ids, 2, 3, transform)
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[2].parameters())
    mapping = cut_layers(model, stack_of(model), [Cut(SpanLayout(2, 3), transform)])
    assert mapping == {0: 0, 1: 1, 5: 2}
    assert model.config.num_hidden_layers == len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert params - sum(p.numel() for p in model.parameters()) == 3 * layer
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_a_cut_model_is_a_stock_checkpoint_that_loads_and_generates_without_the_library(tmp_path):
    model = decoder("qwen2")  # Qwen2's config has a per-layer list (layer_types): it must shrink with the layers
    ids = torch.tensor([[5, 9, 3, 17, 2]])
    cut_layers(model, stack_of(model), [Cut(SpanLayout(1, 2), torch.eye(32) * 1.01), Cut(SpanLayout(4, 1))])
    assert len(model.config.layer_types) == model.config.num_hidden_layers == 3
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "layercollapse" not in config and config["num_hidden_layers"] == 3
    code = ("import sys, torch, transformers; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()\n"
            "assert 'hf_layercollapse' not in sys.modules\n"
            "print(m.generate(torch.tensor([[5, 9, 3, 17, 2]]), max_new_tokens=6, do_sample=False,"
            " pad_token_id=0).tolist())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected.tolist()


def test_cuts_refuse_overlaps_and_a_fused_layer_that_another_cut_removes():
    model = decoder("llama")
    stack = stack_of(model)
    with pytest.raises(ValueError, match="overlap"):
        cut_layers(model, stack, [Cut(SpanLayout(1, 2)), Cut(SpanLayout(2, 2))])
    with pytest.raises(ValueError, match="takes the map"):
        cut_layers(model, stack, [Cut(SpanLayout(1, 2)), Cut(SpanLayout(3, 1), torch.eye(32))])
    with pytest.raises(ValueError, match=r"not \(32, 32\)"):
        cut_layers(model, stack, [Cut(SpanLayout(1, 1), torch.eye(31))])
    assert len(model.model.layers) == 6  # nothing changed
    cut_layers(model, stack, [Cut(SpanLayout(1, 2)), Cut(SpanLayout(3, 1))])  # adjacent plain cuts are one cut
    assert len(model.model.layers) == 3


def test_span_layouts_refuse_what_they_cannot_be():
    with pytest.raises(ValueError, match="starts at a layer >= 1"):
        SpanLayout(0, 2)
    with pytest.raises(ValueError, match="at least one layer"):
        SpanLayout(3, 0)
    assert hlc.units.Layout.from_dict(SpanLayout(4, 3).to_dict()) == SpanLayout(4, 3)


def test_layouts_spans_cannot_handle_are_refused_clearly():
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    seq2seq = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("t5", vocab_size=99, d_model=32, d_kv=8, d_ff=64,
                                                                      num_layers=2, num_heads=4))
    with pytest.raises(ValueError, match="not a decoder-only model"):
        stack_of(seq2seq)
    bert = AutoModelForCausalLM.from_config(AutoConfig.for_model("bert", **TEXT, is_decoder=True))
    with pytest.raises(ValueError, match="decoder layers with one MLP block each"):  # post-LN layers own their MLP
        stack_of(bert)
    moe = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **TEXT, num_key_value_heads=HEADS,
                                                                num_local_experts=4, num_experts_per_tok=2))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        stack_of(moe)
    gemma2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **TEXT, num_key_value_heads=HEADS,
                                                                   head_dim=8))
    stack = stack_of(gemma2)
    assert not stack.fusable  # Gemma-2 normalises its MLP output before the residual: maps cannot be fused
    with pytest.raises(ValueError, match="cannot be fused"):
        cut_layers(gemma2, stack, [Cut(SpanLayout(1, 1), torch.eye(32))])
    cut_layers(gemma2, stack, [Cut(SpanLayout(1, 1))])  # a plain cut is fine
    assert gemma2.config.num_hidden_layers == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fusability_is_read_in_half_precision_too(dtype):
    """A Llama in bf16/fp16 adds its MLP output to the residual as it is (fusable); Gemma-2, which normalises it, is
    not — the check's tolerance follows the dtype's rounding."""
    assert stack_of(decoder("llama").to(dtype)).fusable
    gemma2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **TEXT, num_key_value_heads=HEADS,
                                                                   head_dim=8)).eval().to(dtype)
    assert not stack_of(gemma2).fusable
