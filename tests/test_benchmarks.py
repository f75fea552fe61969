"""The benchmark scripts still run (their quick modes; the numbers of a quick run are not results)."""

from __future__ import annotations

import argparse
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
    # bf16 mixed precision on the CPU: the Trainer's autocast, the evaluations under it, the planner in fp32
    ("generation.py", ["--dtype", "bfloat16"],
     r"^device: cpu, bfloat16 mixed precision \(fp32 weights\)$[\s\S]*^\| LayerCollapse \(progressive\) \| 2 "),
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


@pytest.fixture
def common(monkeypatch):
    """benchmarks/common.py, its active placement restored after the test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("common")
    monkeypatch.setattr(module, "_active", None)
    return module


def fake_cuda(monkeypatch, count: int = 1, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


def parse(common, *argv: str, threads: int | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--threads", type=int, default=threads)
    common.add_device_arguments(parser)
    return parser, parser.parse_args(argv)


def test_device_options_refuse_what_the_machine_cannot_run(common, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser, args = parse(common, "--device", "cuda", "--dtype", "bfloat16")
    with pytest.raises(SystemExit):
        common.configure(parser, args)
    error = capsys.readouterr().err
    assert "--device cuda: CUDA is not available here" in error and "use --device cpu" in error
    with pytest.raises(SystemExit):
        parse(common, "--dtype", "float64")  # argparse: not a choice
    assert "--dtype: invalid choice: 'float64'" in capsys.readouterr().err
    for device, dtype, message in [("cpu", "float16", "--dtype float16 on --device cpu: float16 mixed precision "
                                                       "needs CUDA; use --dtype bfloat16 or float32"),
                                   ("mps", "float32", "--device mps: the benchmarks run on cpu or cuda"),
                                   ("gpu0", "float32", "--device gpu0: not a device name")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            common.resolve_placement(device, dtype)
    fake_cuda(monkeypatch, count=2, bf16=False)
    with pytest.raises(ValueError, match=re.escape("--device cuda:2: 2 CUDA device(s) visible; use --device cuda:0")):
        common.resolve_placement("cuda:2", "float32")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=N with --device cuda"):  # the Trainer would use both
        common.resolve_placement("cuda", "float32")
    assert common.resolve_placement("cuda:1", "float32", training=False).device == torch.device("cuda:1")
    with pytest.raises(ValueError, match=re.escape("--dtype bfloat16: Fake GPU has no bfloat16 support; use --dtype "
                                                   "float16")):
        common.resolve_placement("cuda:1", "bfloat16", training=False)


def test_device_options_cpu_defaults_are_the_trainer_arguments_of_the_cpu_results(common, monkeypatch):
    parser, args = parse(common)
    placement = common.configure(parser, args)
    assert (args.device, args.dtype, args.threads) == ("cpu", "float32", 1)
    assert placement.training_kwargs() == {"use_cpu": True}
    assert (placement.device, placement.dtype) == (torch.device("cpu"), torch.float32)
    assert {"device": "cpu", "dtype": "float32"}.items() <= common.environment().items()
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    gated = importlib.import_module("gated_perplexity")
    training = gated.training_arguments(argparse.Namespace(batch_size=4, lr=3e-4, seed=0), steps=8)
    assert training.use_cpu and not training.bf16 and not training.fp16
    assert common.resolve_placement("cpu", "bfloat16").training_kwargs() == {"use_cpu": True, "bf16": True}


def test_device_options_on_cuda_train_in_mixed_precision(common, monkeypatch):
    fake_cuda(monkeypatch)
    placement = common.resolve_placement("cuda", "bfloat16")
    assert placement.training_kwargs() == {"use_cpu": False, "bf16": True}
    assert placement.label() == "cuda (Fake GPU), bfloat16 mixed precision (fp32 weights)"
    assert placement.record() == {"device": "cuda", "dtype": "bfloat16", "gpu": "Fake GPU"}
    assert common.resolve_placement("cuda:0", "float16").training_kwargs() == {"use_cpu": False, "fp16": True}
    assert common.resolve_placement("cuda", "float32").training_kwargs() == {"use_cpu": False}
    parser, args = parse(common, "--device", "cuda", "--dtype", "bfloat16", threads=3)
    common.configure(parser, args)
    assert args.threads == 3 and common.environment()["gpu"] == "Fake GPU"


def test_gpu_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(BENCHMARKS / "run_gpu.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
