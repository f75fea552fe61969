"""Held-out perplexity against collapsed MLP blocks of a small GPT-2 trained from scratch on Shakespeare.

    python benchmarks/generation.py                 # full run (about 35 minutes on one CPU thread)
    python benchmarks/generation.py --quick         # CI smoke run: a tiny model, a few steps (not results)

A ``GPT2LMHeadModel`` built from a ``GPT2Config`` (4 blocks, n_embd 256, n_inner 1024, 128 positions, tied
embeddings, no dropout) is pretrained from scratch on 38 Shakespeare texts, tokenised with the real GPT-2 tokenizer
(50,257 tokens, from ``examples/offline_assets.py``); the perplexity is measured on fixed windows of the held-out
plays (Hamlet, Julius Caesar, The Tempest, Twelfth Night). Then, for k = 0..n_layer collapsed MLP blocks:

* LayerCollapse (ours): the pretrained model with every block injected (blend activation), fine-tuned by
  ``LayerCollapseTrainer`` on the progressive schedule (``progressive_steps`` = ``--stage_steps``, deepest block
  first): block i is regularised alone for one stage, then held at α = 1. At the end of stage k a deep copy is
  collapsed with ``collapse_model`` (the k finished blocks, α exactly 1) and evaluated.
* plain continued training (reference): the same steps, data order, learning rate and seed with a plain
  ``Trainer`` and nothing collapsed, evaluated at the same steps: it separates what collapsing costs from what the
  extra training gives.
* naive linearisation: the pretrained model with the last k blocks' activation made the identity and merged
  (W2·W1), no training.
* the calibration planner (``plan_collapse``, data-aware merge, 32 training windows), its k cheapest blocks, no
  training.

``--linear_target fitted|affine``: ours blends towards per-channel lines or each block's least-squares affine map,
fitted on the calibration windows and again when each block's stage starts (``--name`` keeps the results apart).
With several ``--seeds`` only the fine-tuning (ours and plain) is repeated; the pretrained model is one
(``--pretrain_seed``). ``--device`` / ``--dtype``: the Trainer's device and mixed precision (fp32 master weights),
the evaluations and samples under the same autocast. Writes results/generation.{json,md,png} and, in the JSON,
greedy 30-token samples.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time

import torch
from common import (
    RESULTS,
    active_placement,
    add_device_arguments,
    assets,
    configure,
    environment,
    markdown_table,
    new_plot,
    save_plot,
    without_autocast,
)
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging

import hf_layercollapse as hlc
from hf_layercollapse.collapse import model_params

PROMPT = "Ham.\nTo be, or not to be,--that is the question:--\n"
REFIT = " (fitted on the calibration windows, refitted at each stage start)"


# ------------------------------------------------------------------------------------------------------ data
def token_windows(tokenizer, texts: list[str], length: int, max_chars: int | None) -> torch.Tensor:
    """The texts joined by blank lines, tokenised, cut into non-overlapping windows [n, length]."""
    text = "\n\n".join(texts)
    ids = torch.tensor(tokenizer(text[:max_chars] if max_chars else text)["input_ids"])
    n = len(ids) // length
    return ids[: n * length].view(n, length)


class Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """exp of the mean next-token loss over all predicted tokens of the windows."""
    was_training = model.training
    model.eval()
    windows = windows.to(next(model.parameters()).device)
    total = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        with active_placement().autocast():
            total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    model.train(was_training)
    return math.exp(total / len(windows))


@torch.no_grad()
def sample(model, tokenizer, new_tokens: int = 30) -> str:
    model.eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    with active_placement().autocast():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:])


# ---------------------------------------------------------------------------------------------------- training
def training_args(steps: int, lr: float, seed: int, batch_size: int, warmup: int, **kwargs) -> TrainingArguments:
    return TrainingArguments(tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=lr, warmup_steps=warmup, weight_decay=0.01, adam_beta2=0.95, report_to=[],
                             save_strategy="no", disable_tqdm=True, seed=seed, data_seed=seed, logging_steps=5,
                             dataloader_num_workers=0, **active_placement().training_kwargs(), **kwargs)


def finetune_args(steps: int, seed: int, args) -> TrainingArguments:
    """Ours and plain: the same steps, data order and constant learning rate (after a short warm-up)."""
    return training_args(steps, args.lr, seed, args.batch_size, args.warmup, lr_scheduler_type="constant_with_warmup")


class EvaluateAt(TrainerCallback):
    """Evaluates at the given optimizer steps (``on_step_end``: after the progressive schedule's update)."""

    def __init__(self, steps: list[int], evaluate) -> None:
        self.steps, self.evaluate = set(steps), evaluate

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            with torch.random.fork_rng():  # evaluating must not change the dropout masks to come
                self.evaluate(model, state.global_step)


def pretrain(config: GPT2Config, train: Windows, args) -> GPT2LMHeadModel:
    torch.manual_seed(args.pretrain_seed)
    model = GPT2LMHeadModel(config)
    warmup = max(1, args.pretrain_steps // 20)
    targs = training_args(args.pretrain_steps, args.pretrain_lr, args.pretrain_seed, args.batch_size, warmup,
                          lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1})
    Trainer(model=model, args=targs, train_dataset=train).train()
    return without_autocast(model).eval()  # the baselines' calibration and merges see its own fp32 forward


def layercollapse(base, train: Windows, evaluation: torch.Tensor, calibration: torch.Tensor, args,
                  seed: int) -> tuple[list[dict], dict]:
    fitted = args.linear_target != "default"
    batches = [{"input_ids": calibration[i:i + 8].clone()} for i in range(0, len(calibration), 8)] if fitted else None
    model = hlc.get_collapse_model(copy.deepcopy(base).train(),
                                   hlc.LayerCollapseConfig(activation="blend", linear_target=args.linear_target),
                                   calibration_data=batches)
    order = list(hlc.injected_activations(model))[::-1]  # deepest first, the schedule's order
    n = len(order)
    rows, kept, alpha_end = [], {}, {}

    def evaluate(trained, step: int) -> None:
        k = step // args.stage_steps
        acts = hlc.injected_activations(trained)
        assert all(acts[name].alpha_value == 1.0 for name in order[:k]), {n: a.alpha_value for n, a in acts.items()}
        clone = without_autocast(copy.deepcopy(trained))
        hlc.collapse_model(clone, blocks=order[:k])
        rows.append({"method": "LayerCollapse (progressive)", "seed": seed, "k": k, "step": step,
                     "perplexity": perplexity(clone, evaluation), "params": model_params(clone),
                     "collapsed": order[:k], "alpha_before_hold": alpha_end.get(order[k - 1])})
        if k == n:
            kept["model"] = clone

    class AlphaBeforeHold(TrainerCallback):  # α of the active block one step before its stage ends
        def on_step_end(self, targs, state, control, **kwargs):
            if (state.global_step + 1) % args.stage_steps == 0 and state.global_step // args.stage_steps < n:
                block = order[state.global_step // args.stage_steps]
                alpha_end[block] = hlc.injected_activations(model)[block].alpha_value

    collapse_args = hlc.CollapseArguments(alpha_learning_rate=args.alpha_lr, reg_weight=args.reg_weight,
                                          progressive_steps=args.stage_steps, progressive_order="deepest_first")
    steps = n * args.stage_steps
    trainer = hlc.LayerCollapseTrainer(
        model=model, args=finetune_args(steps, seed, args),
        train_dataset=train, collapse_args=collapse_args, calibration_data=batches,  # refit at each stage start
        callbacks=[AlphaBeforeHold(), EvaluateAt([k * args.stage_steps for k in range(1, n + 1)], evaluate)])
    trainer.train()
    alphas = [{k: v for k, v in log.items() if k == "step" or k.startswith("alpha/")}
              for log in trainer.state.log_history if any(k.startswith("alpha/") for k in log)]
    return rows, {"model": kept.get("model"), "alpha_log": alphas}


def plain(base, train: Windows, evaluation: torch.Tensor, args, seed: int, n: int) -> tuple[list[dict], object]:
    model = copy.deepcopy(base).train()
    rows = []

    def evaluate(trained, step: int) -> None:
        rows.append({"method": "plain continued training", "seed": seed, "k": 0, "step": step,
                     "perplexity": perplexity(trained, evaluation), "params": model_params(trained)})

    steps = n * args.stage_steps
    Trainer(model=model, args=finetune_args(steps, seed, args),
            train_dataset=train,
            callbacks=[EvaluateAt([k * args.stage_steps for k in range(1, n + 1)], evaluate)]).train()
    return rows, model


# ---------------------------------------------------------------------------------------------------- baselines
def naive(model, k: int) -> None:
    """Make the last k blocks' activation the identity and merge them (W2·W1): no training."""
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=list(range(-k, 0))))
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    hlc.collapse_model(model)


def baselines(base, evaluation: torch.Tensor, calibration: torch.Tensor, args, n: int) -> tuple[list[dict], dict]:
    rows, models = [], {}
    batches = [{"input_ids": calibration[i:i + 8].clone()} for i in range(0, len(calibration), 8)]
    full = hlc.plan_collapse(copy.deepcopy(base), batches, num_blocks=n, show_progress=False)
    ranked = sorted(full.candidates, key=lambda c: c.cost)
    for k in range(1, n + 1):
        clone = copy.deepcopy(base)
        naive(clone, k)
        rows.append({"method": "naive linearisation", "seed": None, "k": k, "step": 0,
                     "perplexity": perplexity(clone, evaluation), "params": model_params(clone)})
        models["naive"] = clone
        clone = copy.deepcopy(base)
        plan = hlc.CollapsePlan(ranked[:k], full.candidates, full.objective, full.baseline, 0.0, full.params_total)
        hlc.collapse_model(clone, plan=plan)
        rows.append({"method": "planner (data-aware)", "seed": None, "k": k, "step": 0,
                     "perplexity": perplexity(clone, evaluation), "params": model_params(clone),
                     "collapsed": [c.name for c in ranked[:k]], "merges": [c.method for c in ranked[:k]]})
        models["planner"] = clone
    return rows, models


# ------------------------------------------------------------------------------------------------------ report
def summarise(rows: list[dict], base: dict) -> list[dict]:
    plain_at = {}
    for r in rows:
        if r["method"] == "plain continued training":
            plain_at.setdefault(r["step"], []).append(r)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["k"], r["step"]), []).append(r)
    out = []
    for (method, k, step), items in groups.items():
        ppl = [i["perplexity"] for i in items]
        mean = statistics.mean(ppl)
        spread = f" ± {statistics.stdev(ppl):.1f}" if len(ppl) > 1 else ""
        if step and method != "plain continued training":  # paired with plain of the same seed and step
            by_seed = {p["seed"]: p["perplexity"] for p in plain_at.get(step, [])}
            vs_plain = statistics.mean(100 * (i["perplexity"] / by_seed[i["seed"]] - 1) for i in items)
            vs_plain_text = f"{vs_plain:+.1f}%"
        else:
            vs_plain_text = "–"
        removed = base["params"] - items[0]["params"]
        out.append({"method": method, "k": k, "extra steps": step, "perplexity": f"{mean:.1f}{spread}",
                    "vs pretrained": f"{100 * (mean / base['perplexity'] - 1):+.1f}%", "vs plain, same step":
                    vs_plain_text, "params removed": f"{removed / 1e6:.2f}M ({100 * removed / base['params']:.1f}%)",
                    "of non-embedding": f"{100 * removed / base['non_embedding']:.1f}%", "seeds": len(items)})
    order = {"pretrained": 0, "plain continued training": 1, "LayerCollapse (progressive)": 2,
             "naive linearisation": 3, "planner (data-aware)": 4}
    return sorted(out, key=lambda r: (order.get(r["method"], 9), r["k"], r["extra steps"]))


def plot(rows: list[dict], base: dict, path) -> None:
    fig, ax = new_plot()
    styles = {"LayerCollapse (progressive)": "o-", "naive linearisation": "s-", "planner (data-aware)": "^-",
              "plain continued training": "x--"}
    for method, style in styles.items():
        ks = sorted({r["step"] if method == "plain continued training" else r["k"] for r in rows
                     if r["method"] == method})
        if not ks:
            continue
        if method == "plain continued training":  # x = the stage it matches (same number of extra steps)
            stage = max(r["step"] for r in rows if r["method"] == "LayerCollapse (progressive)") // max(
                r["k"] for r in rows if r["method"] == "LayerCollapse (progressive)")
            points = [(s // stage, statistics.mean(r["perplexity"] for r in rows
                                                   if r["method"] == method and r["step"] == s)) for s in ks]
            label = "plain continued training (nothing collapsed; x = same steps as ours)"
        else:
            points = [(k, statistics.mean(r["perplexity"] for r in rows if r["method"] == method and r["k"] == k))
                      for k in ks]
            label = method
        points = [(0, base["perplexity"]), *points]
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    ax.axhline(base["perplexity"], color="grey", lw=0.8, ls=":", label="pretrained")
    ax.set_yscale("log")
    ax.set_xticks(range(max(r["k"] for r in rows) + 1))
    ax.set_xlabel("collapsed MLP blocks k (deepest first for ours and naive)")
    ax.set_ylabel("held-out perplexity (log scale)")
    save_plot(fig, ax, "GPT-2 config (from scratch), Shakespeare held-out plays", path, legend_size=7, grid="both")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the fine-tuning (ours, plain)")
    parser.add_argument("--pretrain_seed", type=int, default=1234, help="a data order unlike the fine-tuning seeds")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--n_inner", type=int, default=1024)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--pretrain_steps", type=int, default=350)
    parser.add_argument("--pretrain_lr", type=float, default=3e-3,
                        help="peak; cosine decay to a tenth of it")
    parser.add_argument("--stage_steps", type=int, default=30, help="steps per progressive stage (one block)")
    parser.add_argument("--lr", type=float, default=3e-4,
                        help="fine-tuning learning rate (ours and plain): where the pretraining schedule ended")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--alpha_lr", type=float, default=0.1)
    parser.add_argument("--reg_weight", type=float, default=5.0)
    parser.add_argument("--eval_windows", type=int, default=48)
    parser.add_argument("--calibration_windows", type=int, default=32)
    parser.add_argument("--linear_target", choices=["default", "fitted", "affine"], default="default",
                        help="LayerCollapseConfig.linear_target of ours (fitted on the calibration windows and again "
                             "at each block's stage start)")
    parser.add_argument("--name", default="generation", help="results/NAME.{json,md,png}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on the CPU, all on CUDA)")
    parser.add_argument("--quick", action="store_true")
    add_device_arguments(parser)
    args = parser.parse_args()
    placement = configure(parser, args)
    print(f"device: {placement.label()}", flush=True)
    max_chars = None
    if args.quick:
        args.n_layer, args.n_embd, args.n_inner, args.n_head, args.seq_len, args.batch_size = 2, 32, 128, 2, 32, 4
        args.pretrain_steps, args.stage_steps, args.eval_windows, args.calibration_windows = 4, 2, 8, 16
        max_chars = 200_000
    torch.set_num_threads(args.threads)
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    started = time.time()

    tokenizer = AutoTokenizer.from_pretrained(assets.gpt2_tokenizer_dir())
    plays = assets.load_shakespeare()
    train_windows = token_windows(tokenizer, plays["train"]["text"], args.seq_len, max_chars)
    held_out = token_windows(tokenizer, plays["validation"]["text"], args.seq_len, max_chars)
    pick = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))[:args.eval_windows]
    evaluation = held_out[pick.sort().values]
    calibration = train_windows[-args.calibration_windows:]  # the end of the corpus: seen by nobody in training
    train = Windows(train_windows[:-args.calibration_windows])

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max(args.seq_len, 64), n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, n_inner=args.n_inner, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    base = pretrain(config, train, args)
    pretrain_minutes = (time.time() - started) / 60
    embedding = base.transformer.wte.weight.numel() + base.transformer.wpe.weight.numel()
    info = {"perplexity": perplexity(base, evaluation), "params": model_params(base)}
    info["non_embedding"] = info["params"] - embedding
    print(f"pretrained: perplexity {info['perplexity']:.1f}, {info['params']:,} parameters "
          f"({info['non_embedding']:,} outside the embeddings), {pretrain_minutes:.1f} min", flush=True)
    rows = [{"method": "pretrained", "seed": None, "k": 0, "step": 0, "perplexity": info["perplexity"],
             "params": info["params"]}]
    samples = {"prompt": PROMPT, "pretrained": sample(base, tokenizer)}

    baseline_rows, baseline_models = baselines(base, evaluation, calibration, args, args.n_layer)
    rows += baseline_rows
    samples[f"naive linearisation, k = {args.n_layer}"] = sample(baseline_models["naive"], tokenizer)
    samples[f"planner, k = {args.n_layer}"] = sample(baseline_models["planner"], tokenizer)
    alpha_logs = {}
    for seed in args.seeds:
        plain_rows, plain_model = plain(base, train, evaluation, args, seed, args.n_layer)
        ours_rows, ours = layercollapse(base, train, evaluation, calibration, args, seed)
        rows += plain_rows + ours_rows
        alpha_logs[seed] = ours["alpha_log"]
        if seed == args.seeds[0]:
            samples["plain continued training"] = sample(plain_model, tokenizer)
            samples[f"LayerCollapse, k = {args.n_layer} (all MLPs collapsed)"] = sample(ours["model"], tokenizer)
        print(f"seed {seed} done at {(time.time() - started) / 60:.1f} min", flush=True)

    summary = summarise(rows, info)
    columns = ["method", "k", "extra steps", "perplexity", "vs pretrained", "vs plain, same step", "params removed",
               "of non-embedding", "seeds"]
    table = markdown_table(summary, columns)
    print(table)
    for name, text in samples.items():
        print(f"{name}: {text!r}")
    if args.quick:
        return
    minutes = (time.time() - started) / 60
    env = {**environment(), "args": vars(args), "minutes": minutes, "pretrain_minutes": pretrain_minutes,
           "train_windows": len(train), "eval_tokens": evaluation.numel(), "config": config.to_diff_dict()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"environment": env, "pretrained": info, "rows": rows, "summary": summary, "samples": samples,
         "alpha_log": alpha_logs}, indent=2) + "\n")
    plot(rows, info, RESULTS / f"{args.name}.png")
    sample_lines = "\n".join(f"- {name}: `{text!r}`" for name, text in samples.items() if name != "prompt")
    (RESULTS / f"{args.name}.md").write_text(
        f"# Held-out perplexity vs collapsed MLP blocks (GPT-2 config from scratch, Shakespeare)\n\n"
        f"Command: `{env['command']}` ({minutes:.0f} min on {env['machine']}, {env['cpus']} CPUs, "
        f"{args.threads} torch thread(s), {placement.label()}; torch {env['torch']}, transformers "
        f"{env['transformers']}).\n\n"
        f"Model: GPT2LMHeadModel, {args.n_layer} blocks, n_embd {args.n_embd}, n_inner {args.n_inner}, "
        f"{args.seq_len} positions, tied embeddings, real GPT-2 tokenizer ({len(tokenizer):,} tokens): "
        f"{info['params']:,} parameters, {info['non_embedding']:,} outside the embeddings. Pretrained from scratch "
        f"for {args.pretrain_steps} steps of {args.batch_size}×{args.seq_len} tokens (seed {args.pretrain_seed}). "
        f"Perplexity on {evaluation.numel():,} tokens of the held-out plays (Hamlet, Julius Caesar, The Tempest, "
        f"Twelfth Night). Ours and plain: {args.n_layer} × {args.stage_steps} extra steps, lr {args.lr}, "
        f"seeds {args.seeds}; ours: progressive, deepest first, α lr {args.alpha_lr}, λ {args.reg_weight}, "
        f"linear target {args.linear_target!r}{REFIT if args.linear_target != 'default' else ''}. "
        f"'vs plain, same step' pairs each seed's run with plain continued training of the same seed and step.\n\n"
        f"{table}\n\n![perplexity vs collapsed blocks]({args.name}.png)\n\n"
        f"Greedy 30-token continuations of `{PROMPT!r}`:\n\n{sample_lines}\n")


if __name__ == "__main__":
    main()
