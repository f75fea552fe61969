"""LayerCollapseTrainer: loss accounting, optimizer groups, schedules, logging, collapse_at_end, resume, DDP."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import training_args
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hf_layercollapse as hlc
from hf_layercollapse.calibration import fit_targets
from hf_layercollapse.targets import GateConstant, Line

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def classification_data(n: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 50, (6,), generator=generator), "labels": torch.tensor(i % 2)}
            for i in range(n)]


def gpt2_lm(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def lm_data(n: int = 16) -> list[dict]:
    """Sequences with different numbers of masked labels, so per-micro-batch token counts differ."""
    generator = torch.Generator().manual_seed(1)
    data = []
    for i in range(n):
        ids = torch.randint(1, 50, (8,), generator=generator)
        labels = ids.clone()
        labels[: i % 5] = -100
        data.append({"input_ids": ids, "labels": labels})
    return data


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_one_step_is_the_same_with_and_without_gradient_accumulation(tmp_path, arch):
    """BERT's head accepts **kwargs but ignores num_items_in_batch (transformers issue 47688); GPT-2's honours it.
    Either way one optimizer step of 1×16 and 2×8 must give the same α and weights."""
    make, data = (bert_classifier, classification_data) if arch == "bert" else (gpt2_lm, lm_data)
    results = []
    for batch, accumulation in ((16, 1), (8, 2)):
        model = hlc.get_collapse_model(make(), hlc.LayerCollapseConfig(reg_weight=0.7))
        args = training_args(tmp_path / f"{batch}", per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation)
        hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=data()).train()
        results.append(state(model))
    single, accumulated = results
    alphas = [k for k in single if k.endswith(".alpha")]
    assert alphas and all(single[k].item() > 0.1 for k in alphas)  # α really moved
    for key in single:
        torch.testing.assert_close(single[key], accumulated[key], atol=2e-6, rtol=1e-5, msg=key)


def test_regulariser_gradient_is_lambda_times_two_one_minus_alpha(tmp_path):
    """With a zero learning rate for everything but α and λ = 0.25, one SGD step moves α by lr·λ·2(1−α)."""
    model = hlc.get_collapse_model(bert_classifier(), hlc.LayerCollapseConfig(reg_weight=0.25))
    collapse_args = hlc.CollapseArguments(alpha_learning_rate=0.1)
    trainer = hlc.LayerCollapseTrainer(model=model, args=training_args(tmp_path, learning_rate=1e-12),
                                       train_dataset=classification_data(), collapse_args=collapse_args)
    before = [a.alpha_value for a in hlc.injected_activations(model).values()]
    trainer.train()
    after = [a.alpha_value for a in hlc.injected_activations(model).values()]
    # the task gradient also reaches α; bound it by comparing with λ = 0
    model0 = hlc.get_collapse_model(bert_classifier(), hlc.LayerCollapseConfig(reg_weight=0.0))
    hlc.LayerCollapseTrainer(model=model0, args=training_args(tmp_path / "zero", learning_rate=1e-12),
                             train_dataset=classification_data(), collapse_args=collapse_args).train()
    task_only = [a.alpha_value for a in hlc.injected_activations(model0).values()]
    for b, a, t in zip(before, after, task_only):
        assert a - t == pytest.approx(0.1 * 0.25 * 2 * (1 - b), abs=1e-6)


def test_alpha_has_its_own_learning_rate_and_no_weight_decay(tmp_path):
    model = hlc.get_collapse_model(bert_classifier())
    trainer = hlc.LayerCollapseTrainer(
        model=model, args=training_args(tmp_path, weight_decay=0.1, optim="adamw_torch"),
        train_dataset=classification_data(), collapse_args=hlc.CollapseArguments(alpha_learning_rate=3e-2))
    optimizer = trainer.create_optimizer()
    alpha_ids = {id(a.alpha) for a in hlc.injected_activations(model).values()}
    groups = [g for g in optimizer.param_groups if any(id(p) in alpha_ids for p in g["params"])]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == alpha_ids
    assert groups[0]["lr"] == 3e-2 and groups[0]["weight_decay"] == 0.0
    decay_names = trainer.get_decay_parameter_names(model)
    assert not any(name.endswith(".alpha") for name in decay_names)
    assert any(name.endswith("intermediate.dense.weight") for name in decay_names)


def test_gate_constants_get_no_weight_decay(tmp_path):
    from helpers import gated_model

    model = hlc.get_collapse_model(gated_model("llama", causal_lm=True))
    trainer = hlc.LayerCollapseTrainer(model=model, args=training_args(tmp_path, weight_decay=0.1),
                                       train_dataset=lm_data())
    decay_names = trainer.get_decay_parameter_names(model)
    assert any(name.endswith("mlp.up_proj.weight") for name in decay_names)
    assert not any(name.endswith((".gate_constant", ".alpha")) for name in decay_names)
    assert sum(name.endswith(".gate_constant") for name, _ in model.named_parameters()) == 2


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [2.0, 2.0, 2.0, 2.0]),
    ("linear", [0.0, 1.0, 2.0, 2.0]),
    ("cosine", [0.0, 1.0, 2.0, 2.0]),
])
def test_reg_weight_schedules(tmp_path, schedule, expected):
    model = hlc.get_collapse_model(bert_classifier())
    args = hlc.CollapseArguments(reg_weight=2.0, reg_schedule=schedule, reg_warmup_ratio=0.5)
    trainer = hlc.LayerCollapseTrainer(model=model, args=training_args(tmp_path), train_dataset=classification_data(),
                                       collapse_args=args)
    trainer.state.max_steps = 4
    values = []
    for step in range(4):
        trainer.state.global_step = step
        values.append(trainer.current_reg_weight())
    assert values == pytest.approx(expected)


def test_logs_carry_regulariser_and_alphas(tmp_path):
    model = hlc.get_collapse_model(bert_classifier(), hlc.LayerCollapseConfig(threshold=0.5))
    trainer = hlc.LayerCollapseTrainer(
        model=model, args=training_args(tmp_path, max_steps=3, per_device_train_batch_size=4),
        train_dataset=classification_data(), collapse_args=hlc.CollapseArguments(alpha_learning_rate=0.4))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    names = list(hlc.injected_activations(model))
    last = logs[-1]
    alphas = [last[f"alpha/{name}"] for name in names]
    # α logged at step 3 is the one used in step 3's forward pass; then one more update happened
    assert 0 < alphas[0] < hlc.injected_activations(model)[names[0]].alpha_value
    assert last["alpha_mean"] == pytest.approx(sum(alphas) / len(alphas))
    assert last["alpha_within_threshold"] == sum(abs(1 - a) <= 0.5 for a in alphas)
    assert last["reg_loss"] == pytest.approx(sum((1 - a) ** 2 for a in alphas), rel=1e-5)
    assert logs[0]["reg_loss"] == pytest.approx(len(names))  # α = 0 at the first step
    assert last["reg_weight"] == 1.0


def test_collapse_at_end_saves_a_model_that_reloads(tmp_path):
    model = hlc.get_collapse_model(bert_classifier(), hlc.LayerCollapseConfig(reg_weight=5.0))
    args = hlc.CollapseArguments(alpha_learning_rate=1.0, collapse_at_end=True)
    out = tmp_path / "out"
    trainer = hlc.LayerCollapseTrainer(model=model, args=training_args(out, max_steps=4, per_device_train_batch_size=4),
                                       train_dataset=classification_data(), collapse_args=args)
    trainer.train()
    assert len(trainer.collapse_report.collapsed) == 2
    assert not hlc.injected_activations(model)
    assert not [f.name for f in out.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl")]  # no pickle
    assert json.loads((out / "training_args.json").read_text())["max_steps"] == 4
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    model.eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    assert sum(p.numel() for p in reloaded.parameters()) == trainer.collapse_report.model_params_after
    assert any("params_saved" in entry for entry in trainer.state.log_history)


def test_collapse_at_end_without_any_block_in_threshold_saves_the_injected_model(tmp_path, caplog):
    model = hlc.get_collapse_model(bert_classifier(), hlc.LayerCollapseConfig(reg_weight=0.0))
    args = hlc.CollapseArguments(collapse_at_end=True)
    out = tmp_path / "out"
    trainer = hlc.LayerCollapseTrainer(model=model, args=training_args(out, max_steps=1),
                                       train_dataset=classification_data(), collapse_args=args)
    with caplog.at_level(logging.WARNING, logger="hf_layercollapse.trainer"):
        trainer.train()
    assert "no block" in caplog.text
    assert not trainer.collapse_report.collapsed
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    loaded_alphas = [a.alpha_value for a in hlc.injected_activations(reloaded).values()]
    assert loaded_alphas == pytest.approx([a.alpha_value for a in hlc.injected_activations(model).values()])


class StopAt(TrainerCallback):
    """Stops training right after step ``step``: a run that "crashes" once that step's checkpoint is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def resumed_like_full_run(tmp_path, run, step: int) -> tuple[dict, dict]:
    """``run(out, resume=..., callbacks=...) -> state``: once uninterrupted, once stopped after ``step`` and resumed
    from ``checkpoint-<step>``; asserts that the resumed run ends where the uninterrupted one does. Returns the
    states of the uninterrupted and of the stopped run."""
    full = run(tmp_path / "full")
    interrupted = run(tmp_path / "part", callbacks=[StopAt(step)])
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / f"checkpoint-{step}"))
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=1e-5, msg=key)
    return full, interrupted


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    def run(out, resume=None, callbacks=None):
        model = hlc.get_collapse_model(bert_classifier(), hlc.LayerCollapseConfig(reg_weight=0.3))
        args = training_args(out, max_steps=4, per_device_train_batch_size=4, optim="adamw_torch",
                             learning_rate=1e-2, lr_scheduler_type="linear", save_strategy="steps", save_steps=2)
        trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=classification_data(),
                                           collapse_args=hlc.CollapseArguments(alpha_learning_rate=0.05),
                                           callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return state(model)

    full, interrupted = resumed_like_full_run(tmp_path, run, step=2)
    assert not torch.equal(interrupted["bert.encoder.layer.0.intermediate.intermediate_act_fn.alpha"],
                           full["bert.encoder.layer.0.intermediate.intermediate_act_fn.alpha"])
    assert any(k.endswith(".alpha") for k in full)


def test_mixin_composes_with_seq2seq_trainer(tmp_path):
    class LayerCollapseSeq2SeqTrainer(hlc.LayerCollapseTrainerMixin, Seq2SeqTrainer):
        pass

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                num_heads=2, decoder_start_token_id=0, pad_token_id=0))
    model = hlc.get_collapse_model(model, hlc.LayerCollapseConfig(reg_weight=1.0))
    data = [{"input_ids": torch.tensor([3, 4, 5]), "labels": torch.tensor([6, 7])}] * 8
    args = Seq2SeqTrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                                    save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=1)
    trainer = LayerCollapseSeq2SeqTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert all(a.alpha_value > 0 for a in hlc.injected_activations(model).values())
    assert "reg_loss" in trainer.state.log_history[0]


def test_bf16_mixed_precision_trains(tmp_path):
    model = hlc.get_collapse_model(bert_classifier())
    trainer = hlc.LayerCollapseTrainer(model=model, args=training_args(tmp_path, max_steps=2, bf16=True,
                                                                      per_device_train_batch_size=8),
                                       train_dataset=classification_data())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(0 < a.alpha_value < 1 for a in hlc.injected_activations(model).values())


def test_plain_trainer_gets_same_task_loss(tmp_path):
    """λ = 0 and α frozen: our trainer's first logged loss equals the plain Trainer's."""
    losses = []
    for cls in (Trainer, hlc.LayerCollapseTrainer):
        model = bert_classifier()
        if cls is hlc.LayerCollapseTrainer:
            model = hlc.get_collapse_model(model, hlc.LayerCollapseConfig(reg_weight=0.0))
        trainer = cls(model=model, args=training_args(tmp_path / cls.__name__), train_dataset=classification_data())
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="get_collapse_model"):
        hlc.LayerCollapseTrainer(model=bert_classifier(), args=training_args(tmp_path),
                                 train_dataset=classification_data())
    with pytest.raises(ValueError, match="reg_weight"):
        hlc.CollapseArguments(reg_weight=-1.0)
    with pytest.raises(ValueError, match="reg_schedule"):
        hlc.CollapseArguments(reg_schedule="step")


def test_collapse_arguments_parse_next_to_training_arguments():
    parser = HfArgumentParser((TrainingArguments, hlc.CollapseArguments))
    _, args = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--reg_weight", "0.5", "--reg_schedule", "cosine", "--alpha_learning_rate", "0.01",
         "--collapse_at_end", "--clamp_alpha", "false", "--threshold", "0.1"])
    assert (args.reg_weight, args.reg_schedule, args.alpha_learning_rate) == (0.5, "cosine", 0.01)
    assert args.collapse_at_end and not args.clamp_alpha and args.threshold == 0.1


def _alpha_trajectory(path: Path) -> list[list[float]]:
    logs = json.loads(path.read_text())["logs"]
    return [[v for k, v in sorted(entry.items()) if k.startswith("alpha/")] for entry in logs]


@pytest.mark.parametrize(("progressive_steps", "planned"), [(0, False), (2, False), (1, True)],
                         ids=["all-blocks", "progressive", "planned-order"])
def test_two_processes_under_accelerate_launch_match_one_process(tmp_path, progressive_steps, planned):
    single, ddp = tmp_path / "single.json", tmp_path / "ddp.json"
    schedule = ["--progressive_steps", str(progressive_steps)] + (["--planned"] if planned else [])
    subprocess.run([sys.executable, str(SCRIPT), str(single), "--per_device_batch", "8", *schedule], check=True,
                   capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29517", str(SCRIPT), str(ddp), "--per_device_batch", "4", *schedule]
    # pytest's own variables in the environment make the gloo workers abort at exit ("terminate called without
    # an active exception"); the launch must look like a user's
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    result = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(ddp.read_text())["world_size"] == 2
    expected, got = _alpha_trajectory(single), _alpha_trajectory(ddp)
    assert len(expected) == 4 and (planned or expected[-1][0] > (0.2 if progressive_steps else 0.3))
    if planned:  # α used by each step's forward: a warm-up step, one step per block in the planner's order
        assert expected[:2] == [[0.0, 0.0], [0.0, 0.0]] and sorted(expected[2]) == [0.0, 1.0]
        assert expected[3] == [1.0, 1.0]
    elif progressive_steps:  # α used by each step's forward: layer.1 (deepest) moves in steps 1-2, then held at 1;
        assert [step[1] for step in expected[2:]] == [1.0, 1.0]  # layer.0 held at 0 until its stage (steps 3-4)
        assert expected[1][1] > 0 and expected[2][0] == 0.0
    assert len(got) == len(expected)
    for got_step, expected_step in zip(got, expected):
        assert got_step == pytest.approx(expected_step, abs=1e-6)


def test_evaluation_loss_is_the_task_loss_even_after_collapse(tmp_path):
    model = hlc.get_collapse_model(bert_classifier(), hlc.LayerCollapseConfig(reg_weight=10.0))
    data = classification_data()
    args = training_args(tmp_path, per_device_eval_batch_size=16)
    plain = Trainer(model=model, args=args, eval_dataset=data).evaluate()["eval_loss"]
    trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain, rel=1e-6)  # λ·Σ(1−α)² = 20 is not added
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    hlc.collapse_model(model)
    collapsed = Trainer(model=model, args=args, eval_dataset=data).evaluate()["eval_loss"]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(collapsed, rel=1e-6)


def bert_classifier_3_blocks() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


class RecordAlphas(TrainerCallback):
    """α of every block, in model order, after each step (what any user callback sees in on_step_end)."""

    def __init__(self, model):
        self.acts = list(hlc.injected_activations(model).values())
        self.history: list[list[float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.history.append([a.alpha_value for a in self.acts])


def progressive_run(out, collapse_args, max_steps=8, **kwargs):
    model = hlc.get_collapse_model(bert_classifier_3_blocks(), hlc.LayerCollapseConfig(reg_weight=1.0))
    record = RecordAlphas(model)
    args = training_args(out, max_steps=max_steps, per_device_train_batch_size=4, optim="adamw_torch",
                         learning_rate=1e-2, **kwargs)
    trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=classification_data(),
                                       collapse_args=collapse_args, callbacks=[record])
    trainer.train()
    return model, trainer, record.history


def test_progressive_schedule_collapses_one_block_at_a_time(tmp_path):
    """1 step of plain fine-tuning, then 2 steps per block, deepest first; α held at 0 before and at 1 after."""
    args = hlc.CollapseArguments(progressive_steps=2, progressive_start=1, alpha_learning_rate=0.2)
    model, trainer, history = progressive_run(tmp_path, args)
    assert history[0] == [0.0, 0.0, 0.0]  # step 1: plain fine-tuning, every α held
    for step, (a0, a1, a2) in enumerate(history, start=1):
        if step in (2, 3):  # block 2 (deepest) alone moves; it ends its stage at exactly 1
            assert a0 == a1 == 0.0 and (a2 == 1.0 if step == 3 else 0 < a2 < 1)
        elif step in (4, 5):
            assert a0 == 0.0 and a2 == 1.0 and (a1 == 1.0 if step == 5 else 0 < a1 < 1)
        elif step >= 6:
            assert a1 == a2 == 1.0 and (a0 == 1.0 if step >= 7 else 0 < a0 < 1)
    # the regulariser of the logged steps is the active block's term alone (0 when no block is active)
    logged = [e for e in trainer.state.log_history if "reg_loss" in e]
    assert logged[0]["reg_loss"] == 0.0 and logged[-1]["reg_loss"] == 0.0
    assert logged[1]["reg_loss"] == pytest.approx(1.0)  # step 2: block 2 starts at α = 0
    report = hlc.collapse_model(model)
    assert len(report.collapsed) == 3


def test_progressive_order_by_name_and_its_errors(tmp_path, caplog):
    names = list(hlc.injected_activations(hlc.get_collapse_model(bert_classifier_3_blocks())))
    order = f"{names[1]}, {names[0]}"  # block 2 is not in the order: it keeps its initial α
    _, _, history = progressive_run(tmp_path / "a", hlc.CollapseArguments(progressive_steps=1,
                                                                          progressive_order=order), max_steps=3)
    assert history[0][1] == 1.0 and history[0][0] == 0.0
    assert history[1][:2] == [1.0, 1.0] and history[2] == [1.0, 1.0, 0.0]
    with caplog.at_level(logging.WARNING, logger="hf_layercollapse.trainer"):
        _, _, history = progressive_run(tmp_path / "b", hlc.CollapseArguments(progressive_steps=2), max_steps=3)
    assert "after training stops" in caplog.text and history[-1][0] == 0.0
    with pytest.raises(ValueError, match="progressive_order names"):
        progressive_run(tmp_path / "c", hlc.CollapseArguments(progressive_steps=1, progressive_order="encoder.x"))
    with pytest.raises(ValueError, match="progressive_steps"):
        hlc.CollapseArguments(progressive_steps=-1)
    with pytest.raises(ValueError, match="need progressive_steps > 0"):
        hlc.CollapseArguments(progressive_start=10)


def test_progressive_schedule_leaves_held_parameters_and_their_optimizer_state_alone(tmp_path, caplog):
    """A gated model: α and c of a block whose stage has not begun get no gradient (not even in clipping), so Adam
    keeps no state for them; a finished block's c keeps training (it is part of the linear map)."""
    from helpers import gated_model

    model = hlc.get_collapse_model(gated_model("llama", causal_lm=True))  # 2 gated blocks
    deep, shallow = list(hlc.injected_activations(model).values())[::-1]
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=4, optim="adamw_torch",
                         learning_rate=1e-2, max_grad_norm=1.0)
    trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=lm_data(),
                                       collapse_args=hlc.CollapseArguments(progressive_steps=2))
    with caplog.at_level(logging.WARNING, logger="hf_layercollapse.trainer"):
        trainer.train()  # steps 1-2: deep block's stage; step 3: shallow block's stage begins
    state = trainer.optimizer.state
    assert state[deep.alpha]["step"] == 2 and state[deep.gate_constant]["step"] == 3
    assert state[shallow.alpha]["step"] == 1 and state[shallow.gate_constant]["step"] == 1
    assert deep.alpha_value == 1.0 and shallow.alpha_value > 0
    assert "ends its stage at α = 0.0" in caplog.text  # 2 steps of lr 1e-2 cannot get α near 1: the warning says so


def test_progressive_schedule_follows_model_init(tmp_path):
    def model_init():
        return hlc.get_collapse_model(bert_classifier_3_blocks())

    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=4)
    trainer = hlc.LayerCollapseTrainer(model_init=model_init, args=args, train_dataset=classification_data(),
                                       collapse_args=hlc.CollapseArguments(progressive_steps=1))
    trainer.train()
    assert [a.alpha_value for a in hlc.injected_activations(trainer.model).values()] == [0.0, 1.0, 1.0]


def test_progressive_schedule_resumes_exactly(tmp_path):
    """Stopped in the middle of the second stage, after checkpoint-3."""
    collapse_args = hlc.CollapseArguments(progressive_steps=2, alpha_learning_rate=0.1)

    def run(out, resume=None, callbacks=None):
        config = hlc.LayerCollapseConfig(reg_weight=1.0, init_alpha=0.25)  # blocks before their stage stay at 0.25
        model = hlc.get_collapse_model(bert_classifier_3_blocks(), config)
        args = training_args(out, max_steps=6, per_device_train_batch_size=4, optim="adamw_torch",
                             learning_rate=1e-2, save_strategy="steps", save_steps=3)
        trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=classification_data(),
                                           collapse_args=collapse_args, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return state(model)

    full, _ = resumed_like_full_run(tmp_path, run, step=3)
    assert [v.item() for k, v in full.items() if k.endswith(".alpha")] == [1.0, 1.0, 1.0]


def planned_run(out, max_steps=8, resume=None, callbacks=None, **kwargs):
    """3 affine blocks, 2 warm-up steps, then 2 steps per block in the planner's order."""
    batches = [{"input_ids": torch.stack([d["input_ids"] for d in classification_data(16)[i:i + 8]])}
               for i in (0, 8)]
    model = hlc.get_collapse_model(bert_classifier_3_blocks(), hlc.LayerCollapseConfig(linear_target="affine"),
                                   calibration_data=batches)
    collapse_args = hlc.CollapseArguments(progressive_steps=2, progressive_start=2, progressive_order="planned",
                                          alpha_learning_rate=0.2)
    args = training_args(out, max_steps=max_steps, per_device_train_batch_size=4, optim="adamw_torch",
                         learning_rate=1e-2, **kwargs)
    trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=classification_data(),
                                       collapse_args=collapse_args, calibration_data=batches, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, batches


def test_planned_progressive_order_is_the_planners_ranking_when_the_first_stage_starts(tmp_path):
    """The order is plan_collapse's ranking (cheapest first) of the model as the warm-up left it: the same ranking
    a copy of the run stopped after the warm-up gives; the stages then follow it."""
    warm, _, batches = planned_run(tmp_path / "warm", callbacks=[StopAt(2)])
    plan = hlc.plan_collapse(warm, batches, num_blocks=1, show_progress=False)
    expected = [c.name for c in sorted(plan.candidates, key=lambda c: c.cost)]
    history: list[dict[str, float]] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            history.append({n: a.alpha_value for n, a in hlc.injected_activations(model).items()})

    model, trainer, _ = planned_run(tmp_path / "full", callbacks=[Record()])
    assert trainer.progressive.names == expected
    assert expected != list(hlc.injected_activations(model))[::-1]  # not deepest first: the test tells them apart
    alphas = {name: [step[name] for step in history] for name in expected}
    for stage, name in enumerate(expected):  # block `stage` of the order reaches 1 at the end of its stage
        end = 2 + 2 * (stage + 1)
        assert alphas[name][end - 1] == 1.0 and all(a < 1.0 for a in alphas[name][:end - 2])
    with pytest.raises(ValueError, match="progressive_order='planned' ranks the blocks"):
        hlc.LayerCollapseTrainer(model=model, args=training_args(tmp_path), train_dataset=classification_data(),
                                 collapse_args=hlc.CollapseArguments(progressive_steps=1, progressive_order="planned"))


def test_planned_progressive_order_resumes_exactly(tmp_path):
    """The chosen order is saved with each checkpoint and read back on resuming; without it, resuming is refused."""
    def run(out, resume=None, callbacks=None):
        model, _, _ = planned_run(out, resume=resume, callbacks=callbacks, save_strategy="steps", save_steps=3)
        return state(model)

    resumed_like_full_run(tmp_path, run, step=3)
    saved = tmp_path / "part" / "checkpoint-3" / "layercollapse_progressive_order.json"
    assert len(json.loads(saved.read_text())["progressive_order"]) == 3
    saved.write_text(json.dumps({"progressive_order": ["bert.encoder.layer.9"]}))
    with pytest.raises(ValueError, match="does not hold an order of this model's blocks"):
        run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-3"))
    saved.unlink()
    with pytest.raises(ValueError, match=r"without layercollapse_progressive_order\.json"):
        run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-3"))


class LinesAtStepBegin(TrainerCallback):
    """Each block's fitted line at the start of every step, and the line a fit of the model as it is then gives."""

    def __init__(self, model, batches):
        self.model, self.batches, self.seen = model, batches, []

    def on_step_begin(self, args, state, control, **kwargs):
        acts = hlc.injected_activations(self.model)
        blocks = [hlc.MLPBlock(name, i, act.layout) for i, (name, act) in enumerate(acts.items())]
        fits = fit_targets(self.model, {block: Line() for block in blocks}, self.batches)
        self.seen.append({name: (act.slope.clone(), fits[name]["slope"]) for name, act in acts.items()})


def test_trainer_refits_each_blocks_line_when_its_stage_starts(tmp_path):
    """With calibration_data, block i's line is the fit of the model as it is when its stage starts (steps 1, 3, 5
    begin the stages: global_step 1, 3, 5 at step begin), and stays fixed from there; without, it keeps the line
    fitted at injection."""
    batches = [{"input_ids": torch.stack([d["input_ids"] for d in classification_data(8)])}]
    config = hlc.LayerCollapseConfig(linear_target="fitted", reg_weight=1.0)
    collapse_args = hlc.CollapseArguments(progressive_steps=2, progressive_start=1, alpha_learning_rate=0.2)
    runs = {}
    for refit in (True, False):
        model = hlc.get_collapse_model(bert_classifier_3_blocks(), config, calibration_data=batches)
        args = training_args(tmp_path, max_steps=7, per_device_train_batch_size=4, optim="adamw_torch",
                             learning_rate=1e-2)
        trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=classification_data(),
                                           collapse_args=collapse_args, calibration_data=batches if refit else None)
        record = LinesAtStepBegin(model, batches)
        trainer.add_callback(record)  # after the trainer's own callbacks: sees the refitted lines
        trainer.train()
        runs[refit] = record.seen
    names = list(runs[True][0])
    for step, block in ((1, names[2]), (3, names[1]), (5, names[0])):  # deepest first
        line, fit = runs[True][step][block]
        torch.testing.assert_close(line, fit, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(line, runs[True][0][block][0], atol=1e-4)  # the model moved since injection
        assert all(torch.equal(seen[block][0], line) for seen in runs[True][step:])  # fixed from then on
        assert all(torch.equal(seen[block][0], runs[False][0][block][0]) for seen in runs[False])


def test_trainer_refits_each_gated_blocks_c_at_its_stage_start_with_gradient_accumulation(tmp_path):
    """Gated blocks: c is refitted (least squares, linear_target="fitted") when the block's stage starts, on the
    model as it is then, also with 2 micro-batches per step; a block still waiting keeps its c (the schedule holds
    it), and the refitted c then trains with the block."""
    from helpers import gated_model

    batches = [{"input_ids": torch.stack([d["input_ids"] for d in lm_data(8)])}]
    model = hlc.get_collapse_model(gated_model("llama", causal_lm=True), hlc.LayerCollapseConfig(
        linear_target="fitted"), calibration_data=batches)
    names = list(hlc.injected_activations(model))

    class Record(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_step_begin(self, args, state, control, **kwargs):
            acts = hlc.injected_activations(model)
            blocks = [hlc.MLPBlock(n, i, a.layout) for i, (n, a) in enumerate(acts.items())]
            fits = fit_targets(model, {block: GateConstant("least_squares") for block in blocks}, batches)
            self.seen.append({n: (a.gate_constant.detach().clone(), fits[n]["gate_constant"]) for n, a in acts.items()})

    injected = {n: a.gate_constant.detach().clone() for n, a in hlc.injected_activations(model).items()}
    args = training_args(tmp_path, max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         optim="adamw_torch", learning_rate=1e-2)
    trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=lm_data(), calibration_data=batches,
                                       collapse_args=hlc.CollapseArguments(progressive_steps=2, progressive_start=1,
                                                                           alpha_learning_rate=0.2))
    record = Record()
    trainer.add_callback(record)
    trainer.train()
    deep, shallow = names[1], names[0]  # stages start at global step 1 (deep) and 3 (shallow)
    for step, name in ((1, deep), (3, shallow)):
        c, fit = record.seen[step][name]
        torch.testing.assert_close(c, fit, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(c, injected[name], atol=1e-5)  # the model moved in the steps before
    assert all(torch.equal(seen[shallow][0], injected[shallow]) for seen in record.seen[:3])  # held until its stage
    final = hlc.injected_activations(model)[shallow].gate_constant.detach()
    assert not torch.equal(final, record.seen[3][shallow][0])  # then it trains (from its second step: α > 0)


def test_trainer_refits_every_line_at_the_first_step_without_a_progressive_schedule(tmp_path):
    batches = [{"input_ids": torch.stack([d["input_ids"] for d in classification_data(8)])}]
    model = hlc.get_collapse_model(bert_classifier_3_blocks(), hlc.LayerCollapseConfig(linear_target="fitted"),
                                   calibration_data=batches)
    with torch.no_grad():  # the weights change after injection (e.g. another fine-tuned state is loaded)
        model.bert.encoder.layer[1].intermediate.dense.weight.mul_(2.0)
    injected = {name: act.slope.clone() for name, act in hlc.injected_activations(model).items()}
    trainer = hlc.LayerCollapseTrainer(model=model, args=training_args(tmp_path, max_steps=2, learning_rate=1e-3),
                                       train_dataset=classification_data(), calibration_data=batches)
    record = LinesAtStepBegin(model, batches)
    trainer.add_callback(record)
    trainer.train()
    first, second = record.seen
    for name, (line, fit) in first.items():
        torch.testing.assert_close(line, fit, rtol=1e-5, atol=1e-6)
        assert torch.equal(second[name][0], line)  # α moved after step 1: no refit any more
    assert not torch.allclose(first["bert.encoder.layer.1"][0], injected["bert.encoder.layer.1"], atol=1e-4)


def test_trainer_with_calibration_data_resumes_exactly(tmp_path):
    """The refit of the block whose stage starts at the checkpoint's step happens again on resume, on the same model:
    the resumed run ends where the uninterrupted one does."""
    batches = [{"input_ids": torch.stack([d["input_ids"] for d in classification_data(8)])}]

    def run(out, resume=None, callbacks=None):
        config = hlc.LayerCollapseConfig(linear_target="fitted", reg_weight=1.0)
        model = hlc.get_collapse_model(bert_classifier_3_blocks(), config, calibration_data=batches)
        args = training_args(out, max_steps=6, per_device_train_batch_size=4, optim="adamw_torch",
                             learning_rate=1e-2, save_strategy="steps", save_steps=3)
        trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=classification_data(),
                                           collapse_args=hlc.CollapseArguments(progressive_steps=3,
                                                                               alpha_learning_rate=0.2),
                                           callbacks=callbacks, calibration_data=batches)
        trainer.train(resume_from_checkpoint=resume)
        return state(model)

    full, _ = resumed_like_full_run(tmp_path, run, step=3)
    assert [k for k in full if k.endswith(".slope")]


def test_trainer_calibration_data_bad_input(tmp_path):
    from peft import get_peft_model

    peft_model = get_peft_model(bert_classifier(), hlc.LayerCollapseConfig())
    with pytest.raises(ValueError, match="calibrate_linear_targets"):
        hlc.LayerCollapseTrainer(model=peft_model, args=training_args(tmp_path), train_dataset=classification_data(),
                                 calibration_data=[{"input_ids": torch.tensor([[1, 2, 3]])}])
