"""A checkpoint whose only changes are layer removals with fused maps is a stock one that runs in a second engine: a
tiny random Llama, one layer cut by ``cut_layers`` with a map fused into the layer before, saved, loaded by plain
transformers in a fresh process, converted to GGUF with llama.cpp's ``convert_hf_to_gguf.py`` and evaluated by
llama.cpp (``benchmarks/engine_gguf.py`` does the same with the real SmolLM2-135M).

Needs the ``engines`` extra (``pip install -e ".[engines]"``: llama-cpp-python, gguf, sentencepiece) and the converter
of the installed llama-cpp-python (its sdist; ``benchmarks/engine_gguf.py`` fetches it once into the cache, or set
``LLAMA_CPP_CONVERT_SCRIPT``); skipped without them."""

from __future__ import annotations

import importlib.util
import io
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_layercollapse as hlc
from hf_layercollapse.units import Cut, cut_layers, decoder_stack

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
# the benchmark's helpers, loaded from its file (without putting benchmarks/ on sys.path for the other tests)
_spec = importlib.util.spec_from_file_location(
    "engine_gguf", Path(__file__).resolve().parents[1] / "benchmarks" / "engine_gguf.py")
engine_gguf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_gguf)

#: llama.cpp (f32 weights, f32 KV cache) against transformers: max |Δ logit| ≤ REL_TOL × max |logit| (measured: 7e-7)
REL_TOL = 1e-4
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their").split()


def tiny_tokenizer(folder: Path) -> int:
    """A small SentencePiece BPE ``tokenizer.model`` trained on the spot (the converter's ``llama`` vocabulary needs
    no pre-tokenizer hash, so no real tokenizer asset is needed); returns its vocabulary size."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=256,
                                   model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()


def test_cut_checkpoint_matches_transformers_in_llama_cpp(tmp_path):
    try:
        script = engine_gguf.find_convert_script(fetch=False)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    original, cut = tmp_path / "original", tmp_path / "cut"
    original.mkdir()
    vocab = tiny_tokenizer(original)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(original)
    ids = torch.randint(3, vocab, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    before = engine_gguf.hf_logits(model, ids)

    stack = decoder_stack(model, hlc.find_mlp_blocks(model))
    transform = torch.eye(64) + 0.1 * torch.randn(64, 64)
    cut_layers(model, stack, [Cut(stack.span(2, 1).layout, transform)])
    assert model.config.num_hidden_layers == 3
    expected = engine_gguf.hf_logits(model, ids)
    model.save_pretrained(cut)
    (cut / "tokenizer.model").write_bytes((original / "tokenizer.model").read_bytes())
    stock = engine_gguf.check_stock(cut, json.loads((original / "config.json").read_text()), ids, expected)
    assert stock["stock"], stock["failed_checks"]
    assert stock["changed_config_keys"] == ["num_hidden_layers"] and stock["max_abs_vs_memory"] == 0.0

    gguf = engine_gguf.convert_to_gguf(cut, tmp_path / "cut-f32.gguf", "f32", script)
    fields = engine_gguf.gguf_fields(gguf)
    assert (fields["architecture"], fields["block_count"], fields["file_type"]) == ("llama", 3, 0)
    llm = engine_gguf.open_llama(gguf, threads=1, n_ctx=64)
    assert llm.n_vocab() == vocab
    got = engine_gguf.llama_logits(llm, ids)
    match = engine_gguf.compare_logits(expected, got)
    print(f"llama.cpp vs transformers: {match}")
    assert match["max_rel"] <= REL_TOL, match
    assert match["top1_agree"] == 1.0, match
    # what llama.cpp runs is the cut model, not the original one: the map and the missing layer change every logit
    assert engine_gguf.compare_logits(before, got)["max_rel"] > 100 * REL_TOL
    # the same again from a second, shorter sequence (a fresh KV cache each time)
    assert engine_gguf.compare_logits(engine_gguf.hf_logits(model, ids[:9]),
                                      engine_gguf.llama_logits(llm, ids[:9]))["max_rel"] <= REL_TOL
