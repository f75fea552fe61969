"""Self-distillation in LayerCollapseTrainer (hf_layercollapse.trainer.distillation): the KL against hand-computed
values, zero loss and gradient when student = teacher, exact gradient accumulation with uneven padding, the self teacher
(refused unless exact, then equal to the copy), checkpoints without the teacher, the logged parts of the loss, resume
and DDP.

Run as a script, this file trains the tiny Llama with distillation and writes its logs as JSON (the DDP test launches
it under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import helpers
import pytest
import torch
from helpers import gated_model
from peft import LoraConfig
from safetensors import safe_open
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments

import hf_layercollapse as hlc
from hf_layercollapse.trainer import CopyTeacher, FrozenTeacher, SelfTeacher

PAD = 0


def llama(init_alpha: float = 0.3, reg_weight: float = 0.5, seed: int = 0):
    """The tiny Llama causal LM, injected; α starts away from 0 so the student differs from the original."""
    return hlc.get_collapse_model(gated_model("llama", causal_lm=True, seed=seed),
                                  hlc.LayerCollapseConfig(init_alpha=init_alpha, reg_weight=reg_weight))


def sharp_llama(seed: int = 0):
    """The tiny Llama causal LM (not injected) with sharper predictions than a random init's near-uniform ones, so
    that KL divergences between its variants are well above 0."""
    model = gated_model("llama", causal_lm=True, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def lm_data(n: int = 8, length: int = 10) -> list[dict]:
    """Right-padded sequences with 0..3 padding tokens (labels -100 there), so micro-batches count different tokens."""
    generator = torch.Generator().manual_seed(1)
    data = []
    for i in range(n):
        ids = torch.randint(3, 99, (length,), generator=generator)
        mask = torch.ones(length, dtype=torch.long)
        pads = (3 * i) % 4
        if pads:
            ids[-pads:], mask[-pads:] = PAD, 0
        labels = ids.masked_fill(mask == 0, -100)
        data.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return data


def training_args(out, **kwargs) -> TrainingArguments:
    return helpers.training_args(out, **{"max_steps": 2, "per_device_train_batch_size": 4, **kwargs})


def trainer_for(model, out, distillation: hlc.Distillation, data=None, callbacks=None, **kwargs):
    return hlc.LayerCollapseTrainer(model=model, args=training_args(out, **kwargs), train_dataset=data or lm_data(),
                                    collapse_args=hlc.CollapseArguments(distillation=distillation),
                                    callbacks=callbacks)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batch(data: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([d[k] for d in data]) for k in data[0]}


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, top_k: int | None) -> float:
    """T²·Σ p_t·log(p_t/p_s) for one position, in Python floats (top-k: both renormalised over the teacher's top k)."""
    s, t = [float(v) / temperature for v in student], [float(v) / temperature for v in teacher]
    keep = sorted(range(len(t)), key=lambda i: -t[i])[:top_k] if top_k else range(len(t))
    zs, zt = sum(math.exp(s[i]) for i in keep), sum(math.exp(t[i]) for i in keep)
    return temperature ** 2 * sum(math.exp(t[i]) / zt * (math.log(math.exp(t[i]) / zt) - math.log(math.exp(s[i]) / zs))
                                  for i in keep)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (2.5, None), (1.0, 3), (0.7, 2)])
def test_kl_equals_a_hand_computed_reference(temperature, top_k):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=generator) * 3, torch.randn(2, 3, 7, generator=generator) * 3
    kl = hlc.Distillation(temperature=temperature, top_k=top_k).kl(student, teacher)
    assert kl.shape == (2, 3)
    expected = [[reference_kl(student[b, p], teacher[b, p], temperature, top_k) for p in range(3)] for b in range(2)]
    torch.testing.assert_close(kl, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert (kl > 0).all()
    torch.testing.assert_close(hlc.Distillation(top_k=top_k).kl(teacher, teacher), torch.zeros(2, 3), atol=1e-6,
                               rtol=0)


def test_top_k_at_least_the_vocabulary_is_the_full_kl():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 7, generator=generator), torch.randn(4, 7, generator=generator)
    torch.testing.assert_close(hlc.Distillation(top_k=7).kl(student, teacher), hlc.Distillation().kl(student, teacher))
    assert not torch.allclose(hlc.Distillation(top_k=3).kl(student, teacher), hlc.Distillation().kl(student, teacher))


def test_copy_teacher_gives_zero_loss_and_gradient_while_the_student_is_the_original(tmp_path):
    model = llama(init_alpha=0.0, reg_weight=0.0)
    trainer = trainer_for(model, tmp_path, hlc.Distillation(temperature=2.0))
    assert trainer._teacher is not None and not any(m is trainer._teacher for m in model.modules())
    assert all(not p.requires_grad for p in trainer._teacher.parameters())
    inputs = batch(lm_data(4))
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); compute_loss is called directly here
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=trainer._count_items(inputs))
    assert abs(loss.item()) < 1e-6
    loss.backward()
    grads = [p.grad.abs().max().item() for p in model.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-6
    # the teacher is a copy, not the student: a changed student has a positive KL
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    assert trainer.compute_loss(model, inputs, num_items_in_batch=trainer._count_items(inputs)).item() > 1e-3


def test_trainer_kl_is_the_mean_over_counted_tokens_of_the_original_model(tmp_path):
    """One step on the whole data set: the logged parts are Σ KL / tokens, the mean LM loss and λ·Σ(1−α)², computed
    here from the original model (α = 0) and the student (α = 0.3) independently of the trainer."""
    data = lm_data()
    model = llama()
    objective = hlc.Distillation(temperature=1.5, top_k=20, task_weight=0.25)
    inputs = batch(data)
    with torch.no_grad():
        student = model(**inputs).logits
        task = model(**inputs).loss
        original = {k: v for k, v in model.state_dict().items()}
        teacher_model = llama(init_alpha=0.0)
        teacher_model.load_state_dict({k: (torch.zeros_like(v) if k.endswith(".alpha") else v)
                                       for k, v in original.items()})
        teacher = teacher_model(**inputs).logits
    keep = inputs["labels"][:, 1:] != -100
    expected_kl = objective.kl(student[:, :-1][keep], teacher[:, :-1][keep]).sum() / keep.sum()
    trainer = trainer_for(model, tmp_path, objective, data=data, max_steps=1, per_device_train_batch_size=len(data))
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["loss_kl"] == pytest.approx(expected_kl.item(), rel=1e-5)
    assert log["loss_task"] == pytest.approx(task.item(), rel=1e-5)
    assert log["loss_reg"] == pytest.approx(0.5 * 2 * (1 - 0.3) ** 2, rel=1e-5)
    assert log["loss"] == pytest.approx(0.25 * task.item() + 0.75 * expected_kl.item() + log["loss_reg"], rel=1e-5)


@pytest.mark.parametrize("task_weight", [0.0, 0.4])
def test_gradient_accumulation_is_exact(tmp_path, task_weight):
    """3 optimizer steps of 4 sequences equal 3 steps of 2 × 2 accumulated, with micro-batches of different token
    counts; and distillation changed the result (it is not the task loss alone)."""
    objective = hlc.Distillation(temperature=2.0, top_k=None, task_weight=task_weight)
    results = []
    for batch_size, accumulation, distillation in ((4, 1, objective), (2, 2, objective), (4, 1, None)):
        model = llama()
        trainer = hlc.LayerCollapseTrainer(
            model=model, train_dataset=lm_data(12),
            args=training_args(tmp_path / f"{batch_size}-{distillation is None}", max_steps=3,
                               per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation),
            collapse_args=hlc.CollapseArguments(distillation=distillation))
        trainer.train()
        results.append(state(model))
    single, accumulated, task_only = results
    initial = llama().state_dict()
    for key in single:
        torch.testing.assert_close(single[key], accumulated[key], atol=1e-6, rtol=1e-5, msg=key)
    assert max((single[k] - initial[k]).abs().max().item() for k in single) > 1e-2  # training moved the weights
    assert max((single[k] - task_only[k]).abs().max().item() for k in single) > 1e-3  # and the KL mattered


def _alpha_only(model):
    alphas = {id(a.alpha) for a in hlc.injected_activations(model).values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in alphas)
    return model


def test_self_teacher_is_refused_while_the_projections_train(tmp_path):
    with pytest.raises(ValueError, match=r"teacher='self'.* 'model\.embed_tokens\.weight'.*Use teacher='copy'"):
        trainer_for(llama(), tmp_path, hlc.Distillation(teacher="self"))
    model = _alpha_only(llama())
    trainer = trainer_for(model, tmp_path, hlc.Distillation(teacher="self"))
    assert trainer._teacher is None  # no copy
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="up_proj"):
        trainer.train()


@pytest.mark.parametrize("setup", ["alpha-only", "lora"])
def test_self_teacher_trains_exactly_like_the_copy_teacher_when_only_alpha_or_lora_trains(tmp_path, setup):
    def make():
        base = sharp_llama()
        if setup == "alpha-only":
            return _alpha_only(hlc.get_collapse_model(base, hlc.LayerCollapseConfig(init_alpha=0.5)))
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM",
                          init_lora_weights=False)
        return hlc.get_lora_collapse_model(base, lora, hlc.LayerCollapseConfig(init_alpha=0.3, reg_weight=0.5))

    results, first_kl = [], []
    for teacher in ("self", "copy"):
        torch.manual_seed(0)
        model = make()
        trainer = trainer_for(model, tmp_path / teacher, hlc.Distillation(teacher=teacher, temperature=2.0),
                              max_steps=3)
        trainer.train()
        first_kl.append(trainer.state.log_history[0]["loss_kl"])
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    own, copied = results
    assert first_kl[0] > 1e-3 and first_kl[0] == pytest.approx(first_kl[1], rel=1e-6)
    assert set(own) == set(copied) and (setup == "alpha-only") == all(n.endswith("alpha") for n in own)
    for name in own:
        torch.testing.assert_close(own[name], copied[name], atol=1e-6, rtol=1e-5, msg=name)


def test_self_teacher_restores_alpha_and_adapters_after_its_forward_pass(tmp_path):
    model = _alpha_only(llama())
    trainer = trainer_for(model, tmp_path, hlc.Distillation(teacher="self"))
    model.train()
    before = [a.alpha_value for a in hlc.injected_activations(model).values()]
    logits = trainer._teacher_logits(model, batch(lm_data(2)))
    assert [a.alpha_value for a in hlc.injected_activations(model).values()] == before == pytest.approx([0.3, 0.3])
    assert model.training and not logits.requires_grad
    with torch.no_grad():  # the student at α = 0.3 differs from its own teacher
        assert not torch.allclose(model(**batch(lm_data(2))).logits, logits)


def test_frozen_teacher_is_the_given_model(tmp_path):
    original = gated_model("llama", causal_lm=True)
    student = llama()
    trainer = trainer_for(student, tmp_path, hlc.Distillation(teacher=FrozenTeacher(original)))
    assert trainer._teacher is original and not any(p.requires_grad for p in original.parameters())
    inputs = batch(lm_data(2))
    with torch.no_grad():
        torch.testing.assert_close(trainer._teacher_logits(student, inputs), original(**inputs).logits)
    with pytest.raises(ValueError, match="trained model itself"):
        trainer_for(student, tmp_path, hlc.Distillation(teacher=FrozenTeacher(student)))


def test_a_collapsed_model_is_healed_towards_the_original(tmp_path):
    """No injected block left (all merged): the trainer refuses it without distillation and heals it with."""
    original, student = sharp_llama(), sharp_llama()
    hlc.get_collapse_model(student)
    for act in hlc.injected_activations(student).values():
        act.alpha.data.fill_(1.0)
    hlc.collapse_model(student)
    assert not hlc.injected_activations(student)
    with pytest.raises(ValueError, match="distillation"):
        hlc.LayerCollapseTrainer(model=student, args=training_args(tmp_path), train_dataset=lm_data())
    data = lm_data(8)
    trainer = trainer_for(student, tmp_path, hlc.Distillation(teacher=FrozenTeacher(original)), data=data,
                          max_steps=6, per_device_train_batch_size=8, optim="adamw_torch", learning_rate=5e-5)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["loss_kl"] > 1e-3 and logs[-1]["loss_kl"] < 0.5 * logs[0]["loss_kl"]
    assert all(entry["loss"] == pytest.approx(entry["loss_kl"]) and entry["loss_reg"] == 0 for entry in logs)
    assert not any(key.startswith(("alpha", "reg_")) for key in logs[0])


def test_checkpoint_holds_no_teacher_and_reloads(tmp_path):
    model = llama()
    out = tmp_path / "out"
    trainer = trainer_for(model, out, hlc.Distillation(), max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = out / "checkpoint-2"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as handle:
        saved = {key: handle.get_tensor(key) for key in handle.keys()}
    fresh = llama().state_dict()  # the student's keys, from a model no trainer has seen
    assert set(saved) == set(fresh) and set(model.state_dict()) == set(fresh)
    assert sum(t.numel() for t in saved.values()) == sum(t.numel() for t in fresh.values())
    stored = {id(t) for t in model.state_dict().values()}
    assert not any(id(p) in stored for p in trainer._teacher.parameters())  # the teacher shares no tensor
    assert not [f.name for f in checkpoint.iterdir() if "teacher" in f.name]
    record = json.loads((checkpoint / "layercollapse_distillation.json").read_text())
    assert record["teacher"] == "copy" and len(record["fingerprint"]) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    inputs = batch(lm_data(2))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)
        assert not torch.allclose(reloaded(**inputs).logits, trainer._teacher(**inputs).logits, atol=1e-3)


def test_logged_parts_add_up_to_the_loss(tmp_path):
    objective = hlc.Distillation(temperature=2.0, top_k=10, task_weight=0.3)
    trainer = trainer_for(llama(), tmp_path, objective, data=lm_data(16), max_steps=4, per_device_train_batch_size=2,
                          gradient_accumulation_steps=2, logging_steps=2)
    trainer.collapse_args.reg_schedule, trainer.collapse_args.reg_warmup_ratio = "linear", 1.0  # λ changes each step
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["loss_kl"] > 0 and entry["loss_task"] > 0
        total = 0.3 * entry["loss_task"] + 0.7 * entry["loss_kl"] + entry["loss_reg"]
        assert entry["loss"] == pytest.approx(total, rel=1e-5)
    # λ = 0.5·step/4: 0 in step 1, 0.125 in step 2 (α has hardly moved from 0.3 yet), averaged over the window
    assert logs[0]["loss_reg"] == pytest.approx(0.5 * (0.0 + 0.125 * 2 * 0.7 ** 2), rel=1e-2)


def test_without_distillation_the_parts_are_task_and_regulariser(tmp_path):
    trainer = hlc.LayerCollapseTrainer(model=llama(), args=training_args(tmp_path), train_dataset=lm_data())
    trainer.train()
    entry = trainer.state.log_history[0]
    assert "loss_kl" not in entry
    assert entry["loss"] == pytest.approx(entry["loss_task"] + entry["loss_reg"], rel=1e-6)


def test_bf16_mixed_precision_distils(tmp_path):
    model = llama()
    trainer = trainer_for(model, tmp_path, hlc.Distillation(top_k=5), max_steps=2, bf16=True)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(entry["loss"]) and entry["loss_kl"] > 0 for entry in logs)
    assert all(0.3 < a.alpha_value < 1 for a in hlc.injected_activations(model).values())


def test_resume_mid_run_continues_exactly(tmp_path):
    from test_trainer import resumed_like_full_run

    def run(out, resume=None, callbacks=None, model=None):
        model = model if model is not None else llama()
        trainer = trainer_for(model, out, hlc.Distillation(temperature=2.0, task_weight=0.3), data=lm_data(16),
                              callbacks=callbacks, max_steps=4, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2, optim="adamw_torch", learning_rate=1e-2,
                              lr_scheduler_type="linear", save_strategy="steps", save_steps=2)
        trainer.train(resume_from_checkpoint=resume)
        return state(model)

    full, interrupted = resumed_like_full_run(tmp_path, run, step=2)
    assert not torch.equal(interrupted["model.layers.0.mlp.act_fn.alpha"], full["model.layers.0.mlp.act_fn.alpha"])
    # resuming with a student loaded from the checkpoint would make its copy the teacher: refused
    checkpoint = tmp_path / "part" / "checkpoint-2"
    with pytest.raises(ValueError, match="teacher differs"):
        run(tmp_path / "part", resume=str(checkpoint), model=AutoModelForCausalLM.from_pretrained(checkpoint))


def test_model_init_gets_its_own_teacher(tmp_path):
    built = []

    def model_init():
        built.append(llama())
        return built[-1]

    trainer = hlc.LayerCollapseTrainer(model_init=model_init, args=training_args(tmp_path), train_dataset=lm_data(),
                                       collapse_args=hlc.CollapseArguments(distillation=hlc.Distillation()))
    trainer.train()
    assert len(built) == 2 and trainer.model is built[1]
    inputs = batch(lm_data(2))
    original = built[0]  # untrained: the same weights as built[1] had, at α = 0.3
    for act in hlc.injected_activations(original).values():
        act.alpha.data.zero_()
    with torch.no_grad():
        torch.testing.assert_close(trainer._teacher(**inputs).logits, original.eval()(**inputs).logits)


def test_settings_and_their_errors(tmp_path):
    assert hlc.Distillation.from_string("") == hlc.Distillation()
    parsed = hlc.Distillation.from_string("self, temperature=2, top_k=none, task_weight=0.5")
    assert parsed == hlc.Distillation(teacher=SelfTeacher(), temperature=2.0, top_k=None, task_weight=0.5)
    assert hlc.Distillation(teacher="copy").teacher == CopyTeacher()
    parser = HfArgumentParser((TrainingArguments, hlc.CollapseArguments))
    _, args = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--distillation", "copy,top_k=5"])
    assert args.distillation == hlc.Distillation(top_k=5)
    for bad, match in [({"temperature": 0.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"task_weight": 1.5},
                       "task_weight"), ({"teacher": "teacher"}, "copy")]:
        with pytest.raises(ValueError, match=match):
            hlc.Distillation(**bad)
    with pytest.raises(TypeError, match="FrozenTeacher"):
        hlc.Distillation(teacher=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown setting 'temp'"):
        hlc.Distillation.from_string("temp=2")
    with pytest.raises(TypeError, match="distillation"):
        hlc.CollapseArguments(distillation=3)
    unlabeled = [{"input_ids": d["input_ids"]} for d in lm_data()]
    with pytest.raises(ValueError, match="labels"):
        trainer_for(llama(), tmp_path, hlc.Distillation(), data=unlabeled).train()


# ------------------------------------------------------------------------------------------------------- DDP
def test_two_processes_under_accelerate_launch_match_one_process(tmp_path):
    single, ddp = tmp_path / "single.json", tmp_path / "ddp.json"
    script = [str(Path(__file__)), "--steps", "3"]
    subprocess.run([sys.executable, *script[:1], str(single), *script[1:], "--per_device_batch", "4"], check=True,
                   capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29527", script[0], str(ddp), *script[1:], "--per_device_batch", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}  # see test_trainer's DDP test
    result = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = json.loads(single.read_text()), json.loads(ddp.read_text())
    assert got["world_size"] == 2 and len(expected["logs"]) == len(got["logs"]) == 3
    assert expected["logs"][-1]["loss_kl"] > 1e-3
    for want, have in zip(expected["logs"], got["logs"]):
        assert have == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert got["alphas"] == pytest.approx(expected["alphas"], abs=1e-6)


def _main() -> None:
    """Train the tiny Llama with distillation (copy teacher) and write the logs and the final α as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per_device_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = llama()
    trainer = trainer_for(model, tempfile.mkdtemp(), hlc.Distillation(temperature=2.0, task_weight=0.3),
                          data=lm_data(24), max_steps=args.steps, per_device_train_batch_size=args.per_device_batch)
    trainer.train()
    if trainer.is_world_process_zero():
        keys = ("loss", "loss_kl", "loss_task", "loss_reg", "reg_loss")
        logs = [{k: entry[k] for k in keys} for entry in trainer.state.log_history if "loss" in entry]
        alphas = [a.alpha_value for a in hlc.injected_activations(model).values()]
        Path(args.out).write_text(json.dumps({"world_size": int(os.environ.get("WORLD_SIZE", 1)), "logs": logs,
                                              "alphas": alphas}))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo may abort during interpreter teardown (see tests/scripts/train_tiny.py)
