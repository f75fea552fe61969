"""Faults (``hf_layercollapse.saving`` and the checks around it): a save killed at any point leaves the old checkpoint
or the new one, loadable and exact, and no temporary folder survives the next save; a real SIGKILL mid-save too;
tampered folders are refused naming the file; resuming after a kill mid-checkpoint takes the last complete one; bad
values and edited records get one clear error; NaN is never merged."""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_inputs, outputs, set_alphas, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, TrainingArguments

import hf_layercollapse as hlc
from hf_layercollapse.errors import CheckpointIntegrityError, LayerCollapseConfigError
from hf_layercollapse.saving import MANIFEST_NAME, atomic_folder, clean_stale


class _Killed(BaseException):
    """Stands in for the process dying (not an Exception: nothing catches it on the way)."""


def injected(seed: int, alpha: float) -> torch.nn.Module:
    model = hlc.get_collapse_model(tiny_model("bert", seed=seed))
    set_alphas(model, alpha, 1.0)
    return model


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if ".layercollapse-" in p.name)


def kill_at(monkeypatch, count: int) -> None:
    """Die at the ``count``-th file opened for writing, rename or link, or halfway through the ``count``-th weight
    file (safetensors writes from Rust, past ``open``)."""
    import transformers.modeling_utils as modeling_utils

    calls = {"n": 0}

    def tick():
        calls["n"] += 1
        if calls["n"] == count:
            raise _Killed

    real_save = modeling_utils.safe_save_file

    def saved(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        try:
            tick()
        except _Killed:
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise

    monkeypatch.setattr(modeling_utils, "safe_save_file", saved)

    real_open, real_rename, real_replace, real_link = builtins.open, os.rename, os.replace, os.link

    def opened(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            tick()
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(os, "rename", lambda *a, **k: (tick(), real_rename(*a, **k))[1])
    monkeypatch.setattr(os, "replace", lambda *a, **k: (tick(), real_replace(*a, **k))[1])
    monkeypatch.setattr(os, "link", lambda *a, **k: (tick(), real_link(*a, **k))[1])


@pytest.mark.parametrize("shards", [(None, None), ("8KB", None), (None, "8KB")],
                         ids=["single-over-single", "single-over-shards", "shards-over-single"])
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, shards):
    old_shard, new_shard = shards
    old, new = injected(0, 0.3), injected(1, 0.6)
    inputs = make_inputs(old)
    expected = {"old": outputs(old, inputs), "new": outputs(new, inputs)}
    folder = tmp_path / "ckpt"
    seen, point = set(), 0
    while True:
        point += 1
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        old.save_pretrained(folder, **({"max_shard_size": old_shard} if old_shard else {}))
        (folder / "tokenizer_config.json").write_text("{}")  # a file of another writer, kept across saves
        with monkeypatch.context() as patch:
            kill_at(patch, point)
            try:
                new.save_pretrained(folder, **({"max_shard_size": new_shard} if new_shard else {}))
                finished = True
            except _Killed:
                finished = False
        loaded = AutoModel.from_pretrained(folder).eval()
        state = next(k for k, v in expected.items() if all(torch.allclose(a, b, atol=1e-6) for a, b in
                                                           zip(outputs(loaded, inputs), v)))
        seen.add(state)
        assert (folder / "tokenizer_config.json").is_file()
        assert leftovers(folder) == []  # an interrupted save removes its folder (a real kill: the next save does)
        if finished:
            assert state == "new"
            break
        assert point < 200
    assert seen == {"old", "new"} and point > 3


def test_a_real_sigkill_mid_save_leaves_a_loadable_checkpoint_and_the_next_save_cleans_up(tmp_path):
    folder = tmp_path / "ckpt"
    injected(0, 0.3).save_pretrained(folder)
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from helpers import tiny_model, set_alphas\n"
        "import hf_layercollapse as hlc\n"
        "m = hlc.get_collapse_model(tiny_model('bert', seed=1)); set_alphas(m, 0.6, 1.0)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        f"    m.save_pretrained({str(folder)!r}, max_shard_size='4KB')\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # many saves happen: the kill lands inside one
    process.send_signal(signal.SIGKILL)
    process.wait()
    AutoModel.from_pretrained(folder)  # old or new, complete (the manifest is checked on loading)
    injected(2, 0.1).save_pretrained(folder)
    assert leftovers(folder) == []


def test_stale_temporary_folders_of_dead_processes_are_removed_and_a_folder_moved_aside_is_restored(tmp_path):
    target = tmp_path / "ckpt"
    dead = 2**22 + 12345  # no such process
    stale = tmp_path / f".ckpt.layercollapse-tmp-{dead}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    aside = tmp_path / f".ckpt.layercollapse-old-{dead}-abcd1234"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    clean_stale(target)
    assert not stale.exists() and (target / "config.json").is_file() and not aside.exists()
    with atomic_folder(target) as folder:
        (folder / "config.json").write_text('{"new": 1}')
    assert json.loads((target / "config.json").read_text()) == {"new": 1}


def test_tampered_checkpoints_are_refused_naming_the_file(tmp_path):
    model = injected(0, 0.3)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_size="8KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    (folder / "model.safetensors").write_bytes(shards[0].read_bytes())  # a stale single file beside the shards
    with pytest.raises(CheckpointIntegrityError, match=r"\['model\.safetensors'\]"):
        AutoModel.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:-10])  # truncated
    with pytest.raises(CheckpointIntegrityError, match=shards[1].name):
        AutoModel.from_pretrained(folder)
    shards[1].unlink()
    with pytest.raises(CheckpointIntegrityError, match="missing"):
        AutoModel.from_pretrained(folder)
    manifest = folder / MANIFEST_NAME
    manifest.write_text("{not json")
    with pytest.raises(CheckpointIntegrityError, match="manifest"):
        AutoModel.from_pretrained(folder)


def test_resuming_after_a_kill_mid_checkpoint_takes_the_last_complete_one(tmp_path, caplog):
    data = [{"input_ids": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor(1)}] * 16

    from helpers import TEXT
    from transformers import AutoConfig, AutoModelForSequenceClassification, TrainerCallback

    class Die(TrainerCallback):
        """Stops the run after ``step`` (what a kill looks like to the folder, with the same schedule)."""

        def __init__(self, step):
            self.step = step

        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= self.step:
                control.should_training_stop = True

    def run(out, steps, resume=None, die=None):

        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model("bert", **TEXT))
        model = hlc.get_collapse_model(model)
        args = TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=4, report_to=[],
                                 save_strategy="steps", save_steps=2, disable_tqdm=True, use_cpu=True,
                                 learning_rate=1e-2, seed=0, data_seed=0)
        trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=data,
                                           callbacks=[Die(die)] if die else None)
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "killed", 6, die=4)
    (tmp_path / "killed" / "checkpoint-4" / "trainer_state.json").unlink()  # killed while writing checkpoint-4
    with caplog.at_level("WARNING", logger="hf_layercollapse.trainer"):
        resumed = run(tmp_path / "killed", 6, resume=True)
    assert "checkpoint-4" in caplog.text and "incomplete" in caplog.text
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    for partial in (tmp_path / "none").glob("*"):
        partial.unlink()
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        hlc.trainer.trainer.last_complete_checkpoint(str(tmp_path / "none"))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"init_alpha": "abc"}, "init_alpha"), ({"threshold": "high"}, "threshold"), ({"reg_weight": [1.0]}, "reg_weight"),
    ({"layers_to_transform": True}, "layers_to_transform"), ({"threshold": float("nan")}, "threshold"),
    ({"target_modules": 3}, "target_modules")])
def test_wrong_types_in_the_config_name_the_field(kwargs, field):
    with pytest.raises(LayerCollapseConfigError, match=rf"{field}=.*must"):
        hlc.LayerCollapseConfig(**kwargs)


def test_a_config_file_with_a_wrong_value_names_the_file_and_wrong_arguments_say_what_to_pass(tmp_path):
    path = tmp_path / "layercollapse_config.json"
    path.write_text(json.dumps({"threshold": "high"}))
    with pytest.raises(LayerCollapseConfigError, match=rf"threshold='high'.*{path}"):
        hlc.LayerCollapseConfig.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"LayerCollapseConfig\(\*\*your_dict\)"):
        hlc.get_collapse_model(tiny_model("bert"), {"threshold": 0.1})
    with pytest.raises(TypeError, match="from_pretrained"):
        hlc.get_collapse_model("bert-base-uncased")


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda r: r.__setitem__("format", "3"), "format '3'"),
    (lambda r: r["blocks"]["encoder.layer.0"]["layout"].__setitem__("kind", "gated"), "encoder.layer.0"),
    (lambda r: r["blocks"]["encoder.layer.0"].pop("layout"), "no 'layout'"),
    (lambda r: r["blocks"]["encoder.layer.0"].__setitem__("state", "merged"), "state 'merged'"),
    (lambda r: r["blocks"]["encoder.layer.1"].__setitem__("in_features", "32"), "in_features"),
    (lambda r: r["blocks"]["encoder.layer.0"].__setitem__("mode", "relu"), "mode 'relu'"),
])
def test_an_edited_record_is_one_clear_error_naming_the_block(tmp_path, edit, needle):
    model = hlc.get_collapse_model(tiny_model("bert"))
    set_alphas(model, 0.3, 1.0)
    hlc.collapse_model(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config["layercollapse"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayerCollapseConfigError, match=needle):
        AutoModel.from_pretrained(tmp_path)


def test_nan_is_never_merged():
    model = hlc.get_collapse_model(tiny_model("bert"))
    set_alphas(model, 1.0, 1.0)
    with torch.no_grad():
        hlc.injected_activations(model)["encoder.layer.0"].alpha.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.0.*diverged"):
        hlc.collapse_model(model)
    with torch.no_grad():
        hlc.injected_activations(model)["encoder.layer.0"].alpha.fill_(1.0)
        model.encoder.layer[1].output.dense.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"encoder\.layer\.1.*infinite"):
        hlc.collapse_model(model)
    assert len(hlc.injected_activations(model)) == 2  # nothing was merged


def test_the_checkpoint_says_what_it_needs_to_load(tmp_path):
    model = injected(0, 0.5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "pip install hf-layercollapse" in config["layercollapse_requires"]
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert not hasattr(reloaded.config, "layercollapse_requires") or reloaded.config.layercollapse_requires
    weights = load_file(tmp_path / "model.safetensors")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})  # same tensors, new bytes
