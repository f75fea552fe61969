"""The benchmark scripts still run (their quick modes; the numbers of a quick run are not results)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_layercollapse as hlc

pytestmark = pytest.mark.assets  # every test here runs on the real offline assets

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


# the k = 1 row of the gated table: every cell filled, the two costs last (LayerCollapse's, merging after training)
GATED_ROW = r"^\| 1 \| \d+\.\d% \| 1 (\| \d+\.\d\d \([+-]\d+\.\d%\) ){4}\| [+-]\d+\.\d% \| [+-]\d+\.\d% \|$"


@pytest.mark.parametrize("script, options, expected", [
    ("speed.py", [], re.escape("collapsed all 6")),
    ("trainer_overhead.py", [], re.escape("ratio: trainer overhead")),
    ("load_memory.py", [], re.escape("load collapsed last 6")),
    ("quality.py", [], re.escape("planner (data-aware)")),
    ("quality.py", ["--methods", "blend", "--linear_target", "affine", "--refit_targets"],
     re.escape("layercollapse-blend-affine-refit")),
    ("gated_perplexity.py", ["--trainable", "mlps"], GATED_ROW),
    ("generation.py", [], re.escape("LayerCollapse (progressive)")),
    ("onnx_speed.py", [], r"^\| tiny Llama \(causal LM\) \| 2 \| 1 (\| \d+\.\d+ ){8}\|$"),
])
def test_benchmark_quick_mode(script, options, expected):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", *options], capture_output=True,
                            text=True, timeout=600, cwd=BENCHMARKS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(expected, result.stdout, re.MULTILINE), result.stdout[-3000:]


@pytest.mark.parametrize("trainable", ["blocks", "mlps", "all"])
def test_gated_benchmark_trains_the_same_parameters_for_both_methods(monkeypatch, trainable):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    gated = importlib.import_module("gated_perplexity")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1)
    plain, injected = LlamaForCausalLM(config), LlamaForCausalLM(config)
    hlc.get_collapse_model(injected, hlc.LayerCollapseConfig(layers_to_transform=[1]))
    for model in (plain, injected):
        gated.set_trainable(model, ["model.layers.1.mlp"], trainable)
    trained = {n for n, p in injected.named_parameters() if p.requires_grad}
    assert {n for n, p in plain.named_parameters() if p.requires_grad} == trained - {
        "model.layers.1.mlp.act_fn.alpha", "model.layers.1.mlp.act_fn.gate_constant"}
    assert {"model.layers.1.mlp.act_fn.alpha", "model.layers.1.mlp.act_fn.gate_constant"} <= trained
    mlps = {n for n in trained if ".mlp." in n}
    layers = {n.split(".")[2] for n in mlps}
    assert layers == ({"1"} if trainable == "blocks" else {"0", "1", "2"})
    assert (trained == mlps) == (trainable != "all")


def test_quality_paired_comparison_against_the_best_baseline(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    quality = importlib.import_module("quality")
    rows = [{"method": m, "k": 1, "seed": s, "accuracy": a} for m, s, a in [
        ("plain fine-tuning", 0, 0.95), ("plain fine-tuning", 1, 0.95),  # the reference is not a baseline
        ("drop MLP", 0, 0.80), ("drop MLP", 1, 0.90),  # mean 0.85: the best baseline
        ("planner (data-aware)", 0, 0.84), ("planner (data-aware)", 1, 0.84),
        ("layercollapse-blend", 0, 0.82), ("layercollapse-blend", 1, 0.90),
    ]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    [line] = quality.paired_rows(rows, methods, [1])
    # differences +2 and 0 points: mean +1, standard deviation 1.414, standard error 1.0
    assert line == {"method": "layercollapse-blend", "k=1": "+1.00 ± 1.00 (drop MLP)"}
