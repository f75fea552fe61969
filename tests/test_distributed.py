"""FSDP2 on this machine: PyTorch's ``fully_shard`` on CPU (gloo, two processes under ``torchrun``) against one process.

An injected model trained sharded must follow the single-process trajectory (loss, regulariser, α, weights) for the
same global batch, collapse into the same model once its full weights are gathered, and save a checkpoint that
reloads exactly. The Trainer's own FSDP path (``accelerate launch`` with examples/accelerate_configs/fsdp.yaml)
needs GPUs: accelerate does not select FSDP on CPU (see docs/distributed.md); its test runs when CUDA devices are
present.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_layercollapse as hlc

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from fsdp2_train import SEQ, VOCAB, build  # noqa: E402

RTOL = 1e-5  # fp32; reductions over two shards sum in another order than over one


def _run(command: list[str], out: Path) -> Path:
    done = subprocess.run([*command, str(out)], capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp2")
    script = str(SCRIPTS / "fsdp2_train.py")
    single = subprocess.run([sys.executable, script, str(root / "single"), "--single"], capture_output=True,
                            text=True, check=False, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    sharded = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    script], root / "sharded")
    return {"single": root / "single", "sharded": sharded}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp2_distill")
    script = str(SCRIPTS / "fsdp2_train.py")
    single = _run([sys.executable, script, "--single", "--distill"], root / "single")
    sharded = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                    "--distill"], root / "sharded")
    return {"single": single, "sharded": sharded}


def _close(a: float | torch.Tensor, b: float | torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_fsdp2_follows_the_single_process_trajectory(runs):
    single, sharded = (json.loads((runs[k] / "trajectory.json").read_text()) for k in ("single", "sharded"))
    assert len(single) == len(sharded) == 4
    assert single[-1]["alpha"][0] > single[0]["alpha"][0]  # α moved: the regulariser's gradient reached it
    for one, many in zip(single, sharded):
        assert _close(many["loss"], one["loss"]) < RTOL
        assert _close(many["reg"], one["reg"]) < RTOL
        assert _close(many["alpha"], one["alpha"]) < RTOL
    weights = {k: load_file(str(runs[k] / "model.safetensors")) for k in runs}
    assert weights["single"].keys() == weights["sharded"].keys()
    worst = max(_close(weights["sharded"][k], weights["single"][k]) for k in weights["single"])
    assert worst < RTOL, worst
    moved = build().state_dict()
    assert max(_close(weights["single"][k], moved[k]) for k in moved) > 1e-3  # training changed the weights


def test_distillation_under_fsdp2_follows_the_single_process_trajectory(distilled):
    """The KL towards the library's teacher copy (sharded too), divided by the global batch's positions: the same
    losses, α and weights as one process."""
    single, sharded = (json.loads((distilled[k] / "trajectory.json").read_text()) for k in ("single", "sharded"))
    assert len(single) == len(sharded) == 4
    assert single[0]["loss"] > 0 and single[-1]["loss"] > 1e-3  # the student moves away from its teacher (α = 0)
    for one, many in zip(single, sharded):
        assert _close(many["loss"], one["loss"]) < 10 * RTOL  # a KL of close distributions: cancelling fp32 terms
        assert _close(many["reg"], one["reg"]) < RTOL
        assert _close(many["alpha"], one["alpha"]) < RTOL
    weights = {k: load_file(str(distilled[k] / "model.safetensors")) for k in distilled}
    # AdamW's first steps divide by the gradients' own size: their reduction-order rounding reaches the weights
    assert max(_close(weights["sharded"][k], weights["single"][k]) for k in weights["single"]) < 3 * RTOL
    assert not any("teacher" in k for k in weights["sharded"])  # the teacher is never part of the student


def _model(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build().eval()
    model.load_state_dict(weights)
    return model


def test_collapsing_the_gathered_weights_matches_single_process_collapsing(runs):
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    logits = {}
    for kind in runs:
        model = _model(load_file(str(runs[kind] / "model.safetensors")))
        report = hlc.collapse_model(model, blocks=["model.layers.0.mlp"], force=True)
        assert [b.status for b in report.blocks] == ["collapsed", "kept"]
        with torch.no_grad():
            logits[kind] = model(input_ids=ids).logits
    assert _close(logits["sharded"], logits["single"]) < 10 * RTOL


def test_the_sharded_run_saves_a_checkpoint_that_reloads_exactly(runs):
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(6))
    trained = _model(load_file(str(runs["sharded"] / "model.safetensors")))
    reloaded = AutoModelForCausalLM.from_pretrained(runs["sharded"] / "saved").eval()
    assert [a.alpha_value for a in hlc.injected_activations(reloaded).values()] == \
        [a.alpha_value for a in hlc.injected_activations(trained).values()]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the Trainer's FSDP path needs 2 GPUs: accelerate selects "
                    "FSDP for GPU setups only (on CPU it runs DDP), so it cannot be exercised on this machine")
def test_trainer_under_accelerate_fsdp_matches_one_process(tmp_path):
    config = Path(__file__).parents[1] / "examples" / "accelerate_configs" / "fsdp.yaml"
    script = str(SCRIPTS / "train_tiny.py")
    one = subprocess.run([sys.executable, script, str(tmp_path / "one.json"), "--per_device_batch", "8", "--gpu"],
                         capture_output=True, text=True, check=False)
    assert one.returncode == 0, one.stderr[-4000:]
    two = subprocess.run(["accelerate", "launch", "--config_file", str(config), script, str(tmp_path / "two.json"),
                          "--per_device_batch", "4", "--gpu"], capture_output=True, text=True, check=False)
    assert two.returncode == 0, two.stderr[-4000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert b["world_size"] == 2 and len(a["logs"]) == len(b["logs"]) == 4
    for x, y in zip(a["logs"], b["logs"]):
        alphas = sorted(k for k in x if k.startswith("alpha/"))
        assert _close([y[k] for k in alphas], [x[k] for k in alphas]) < RTOL
        assert _close(y["loss"], x["loss"]) < RTOL
