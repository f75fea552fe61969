"""Smoke tests of the example scripts in ``examples/``, run as subprocesses on tiny offline settings.

Each script runs a few steps from its offline JSON file (``examples/configs/``) with flags that shrink it: tiny
GPT-2 and ViT models built from configs, all-MiniLM-L6-v2 on a handful of tweets. Every run must exit 0, save a
checkpoint that reloads with ``AutoModelFor....from_pretrained`` to the collapsed size, and write a results JSON
whose reloaded metric equals the collapsed model's. One more run goes through ``accelerate launch`` with two CPU
processes (DDP over gloo). Needs the offline assets (``bash scripts/install_assets.sh``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import offline_assets as assets
import pytest

pytestmark = pytest.mark.assets  # every test here runs on the real offline assets

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
CONFIGS = EXAMPLES / "configs"
RESULTS_NAME = "layercollapse_results.json"

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}

# A few steps, one block, and α started close enough to 1 that the block collapses.
QUICK = [
    "--max_steps", "2",
    "--layers_to_transform", "-1",
    "--init_alpha", "0.9",
    "--threshold", "0.5",
    "--collapse_at_end", "true",
    "--logging_steps", "1",
    "--save_strategy", "no",
    "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip
TEXT_QUICK = [
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "16",
    "--max_seq_length", "32",
    "--max_train_samples", "32",
    "--max_eval_samples", "16",
]  # fmt: skip


def _require(loader: Any) -> None:
    try:
        loader()
    except assets.MissingAssetError as err:
        pytest.fail(f"offline asset missing (run scripts/install_assets.sh): {err}")


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    output = f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}"
    return proc


def _check_results(output_dir: Path, metric: str) -> dict[str, Any]:
    results = json.loads((output_dir / RESULTS_NAME).read_text())
    assert results["metric"] == metric
    assert results["reload_matches"] is True
    assert results["after_reload"] == pytest.approx(results["after_collapse"], rel=1e-4, abs=1e-6)
    for key in ("before", "after_collapse", "after_reload"):
        value = results[key]
        assert math.isfinite(value)
        if metric == "accuracy":
            assert 0.0 <= value <= 1.0
        else:
            assert value >= 1.0
    assert results["num_collapsed"] == 1 and len(results["collapsed_blocks"]) == 1
    assert results["train_steps"] == 2
    assert results["params_saved"] > 0
    assert results["params_saved"] == results["params_original"] - results["params_after"]
    assert results["params_reloaded"] == results["params_after"]
    assert results["collapse_report"]["blocks"][0]["status"] == "collapsed"
    return results


def _check_reload(output_dir: Path, auto_class_name: str, results: dict[str, Any]) -> None:
    import transformers

    import hf_layercollapse as hlc  # registers the checkpoint format with the Auto classes

    model = getattr(transformers, auto_class_name).from_pretrained(output_dir)
    assert sum(p.numel() for p in model.parameters()) == results["params_after"]
    assert model.config.to_dict()["model_type"] == hlc.MODEL_TYPE


def test_text_classification_offline(tmp_path: Path) -> None:
    _require(assets.minilm_path)
    _require(assets.tweets_csv_path)
    output_dir = tmp_path / "text"
    _run([sys.executable, "examples/run_text_classification.py", str(CONFIGS / "text_classification_offline.json"),
          "--output_dir", str(output_dir), *QUICK, *TEXT_QUICK])
    results = _check_results(output_dir, "accuracy")
    assert results["eval_rows"] == 16 and results["world_size"] == 1
    assert (output_dir / "tokenizer.json").is_file()
    _check_reload(output_dir, "AutoModelForSequenceClassification", results)


def test_clm_offline(tmp_path: Path) -> None:
    _require(assets.gpt2_tokenizer_dir)
    _require(assets.shakespeare_dir)
    output_dir = tmp_path / "clm"
    _run([sys.executable, "examples/run_clm.py", str(CONFIGS / "clm_offline.json"),
          "--output_dir", str(output_dir), *QUICK,
          "--config_overrides", "n_layer=2,n_embd=32,n_head=2,n_positions=64",
          "--block_size", "32", "--max_train_texts", "200", "--max_eval_texts", "100", "--max_eval_samples", "8",
          "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
          "--linear_target", "fitted", "--calibration_samples", "16"])  # lines fitted, refitted in training
    results = _check_results(output_dir, "perplexity")
    assert results["layercollapse_config"]["linear_target"] == "fitted" and results["calibration_samples"] == 16
    assert results["block_size"] == 32 and results["eval_blocks"] == 8
    token_accuracy = results["eval_collapsed"]["collapsed_accuracy"]
    assert results["eval_reloaded"]["reloaded_accuracy"] == pytest.approx(token_accuracy)
    _check_reload(output_dir, "AutoModelForCausalLM", results)


def test_image_classification_offline(tmp_path: Path) -> None:
    _require(assets.fashion_mnist_dir)
    output_dir = tmp_path / "image"
    _run([sys.executable, "examples/run_image_classification.py", str(CONFIGS / "image_classification_offline.json"),
          "--output_dir", str(output_dir), *QUICK,
          "--config_overrides", "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
                                "image_size=28,patch_size=7",
          "--max_train_samples", "32", "--max_eval_samples", "16",
          "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
          "--linear_target", "fitted", "--calibration_samples", "16"])
    results = _check_results(output_dir, "accuracy")
    assert results["train_rows"] == 32 and results["eval_rows"] == 16
    assert (output_dir / "preprocessor_config.json").is_file()
    _check_reload(output_dir, "AutoModelForImageClassification", results)


def test_compress_llm_offline(tmp_path: Path) -> None:
    """Plan (MLP blocks, layers, spans) a tiny Llama with SmolLM2's tokenizer, heal it by distillation, reload it."""
    _require(assets.smollm2_path)
    _require(assets.shakespeare_dir)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                                  max_position_embeddings=256, tie_word_embeddings=True,
                                  eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    output_dir = tmp_path / "compressed"
    _run([sys.executable, "examples/run_compress_llm.py", "--output_dir", str(output_dir),
          "--model_name_or_path", str(tmp_path / "tiny"), "--params_fraction", "0.03", "--block_size", "32",
          "--calibration_windows", "16", "--eval_windows", "4", "--train_block_size", "32", "--train_windows", "8",
          "--max_steps", "2", "--decode_tokens", "4", "--top_k", "50"])
    results = json.loads((output_dir / "compress_results.json").read_text())
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == ["original", "planned", "healed", "reloaded"]
    assert results["selected"] and results["train_steps"] == 2 and len(results["loss_kl"]) == 2
    assert all(value > 0 and math.isfinite(value) for value in results["loss_kl"])
    assert results["params_removed"] == rows["original"]["params"] - rows["reloaded"]["params"] > 0
    assert rows["planned"]["params"] == rows["healed"]["params"] == rows["reloaded"]["params"]
    assert results["reload_matches"] is True
    assert rows["reloaded"]["perplexity"] == pytest.approx(rows["healed"]["perplexity"], rel=1e-4)
    assert rows["healed"]["perplexity"] != rows["planned"]["perplexity"]  # healing changed the weights
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir)
    assert sum(p.numel() for p in reloaded.parameters()) == rows["reloaded"]["params"]
    assert reloaded.config.num_hidden_layers == rows["reloaded"]["layers"] <= 4
    assert (output_dir / "plan").is_dir() and (output_dir / "tokenizer.json").is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_text_classification_two_cpu_processes(tmp_path: Path) -> None:
    _require(assets.minilm_path)
    _require(assets.tweets_csv_path)
    output_dir = tmp_path / "ddp"
    _run([sys.executable, "-m", "accelerate.commands.launch",
          "--config_file", str(EXAMPLES / "accelerate_configs" / "multi_cpu_ddp.yaml"),
          "--main_process_port", str(_free_port()),
          "examples/run_text_classification.py", str(CONFIGS / "text_classification_offline.json"),
          "--output_dir", str(output_dir), *QUICK, *TEXT_QUICK,
          # affine maps (hooks under DDP), refitted in training: broadcast from rank 0
          "--linear_target", "affine", "--calibration_samples", "32"], timeout=400)
    results = _check_results(output_dir, "accuracy")
    assert results["world_size"] == 2 and results["layercollapse_config"]["linear_target"] == "affine"
    assert results["distributed_type"] == "DistributedType.MULTI_CPU"


@pytest.mark.parametrize(
    ("script", "config"),
    [
        ("run_text_classification", "text_classification_offline.json"),
        ("run_clm", "clm_offline.json"),
        ("run_image_classification", "image_classification_offline.json"),
    ],
)
def test_offline_json_parses(script: str, config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each offline JSON file parses with ``HfArgumentParser.parse_json_file`` (no unknown or colliding keys) and
    maps onto a valid ``LayerCollapseConfig``."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module(script)
    _, data_args, injection_args, collapse_args, training_args = module.parse_args([str(CONFIGS / config)])
    assert data_args.offline_demo is True
    assert collapse_args.collapse_at_end is True
    assert training_args.max_steps > 0
    config_obj = injection_args.to_config(collapse_args)
    assert config_obj.threshold == collapse_args.threshold
    assert config_obj.reg_weight == collapse_args.reg_weight
    assert config_obj.layers_to_transform == injection_args.layers_to_transform
