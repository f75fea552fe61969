"""Held-out perplexity of the real SmolLM2-135M (gated MLPs) against k collapsed blocks: the post-training planner,
progressive LayerCollapse fine-tuning with the constant gate, and plain fine-tuning as the fair reference.

    python benchmarks/gated_perplexity.py            # full run (about 40 minutes on 1 CPU thread)
    python benchmarks/gated_perplexity.py --quick    # CI smoke run: 2 blocks, 1 step per stage, tiny texts

SmolLM2-135M-Instruct in fp32 on the CPU, one thread (``--device cuda --dtype bfloat16``: on a GPU, the Trainer's bf16
mixed precision over fp32 weights, the evaluations under the same autocast, the planner and merges in fp32).
Held-out text: the start of Macbeth; calibration text: the start of Hamlet; training text: the other 40 Shakespeare
texts (shuffled 256-token windows). No text is shared.

* ``planner``: :func:`~hf_layercollapse.plan_collapse` on the calibration text measures every one of the 30 blocks
  (least-squares map, gate at its mean, or gate fitted by least squares, chosen per block on its held-out half);
  the k cheapest blocks are merged with the chosen maps, no training.
* ``layercollapse``: the planner's 8 cheapest blocks are injected (constant-gate blend, ``c`` initialised on the
  calibration text as ``--linear_target`` says) and fine-tuned with :class:`~hf_layercollapse.LayerCollapseTrainer` on
  a progressive schedule (cheapest block first, ``--stage_steps`` optimizer steps per block; at the end of its
  stage a block's α is 1). At the end of stages 1, 2, 4 and 8 a deep copy is collapsed (``collapse_model``)
  and evaluated.
* ``plain fine-tuning``: the same trainable parameters (``--trainable``: by default the MLP weights of those 8
  blocks, everything else frozen; ``mlps``: every block's MLP; ``all``: the whole model), data, steps, learning rate
  and seed, without collapsing, evaluated at the same steps. Fine-tuning on Shakespeare
  lowers held-out perplexity by itself; the cost of collapsing is LayerCollapse against plain fine-tuning at the
  same step.
* ``plain fine-tuning, then merged``: at the same steps, a copy of the plain fine-tuned model with the k blocks
  replaced by their least-squares affine maps fitted on the calibration text, no training after (compressing after
  fine-tuning instead of during it).

``--linear_target affine``: each block blends towards its least-squares affine map instead of a constant gate (the
planner's merge, learnable). ``--refit_targets``: each block's ``c`` (or map) is fitted again on the calibration text
when its stage starts, on the model as the earlier stages left it (``LayerCollapseTrainer(calibration_data=...)``).
``--planner_from NAME`` reuses the planner's ranking and rows of results/NAME.json (a run with the same data settings)
instead of measuring the 30 blocks again (most of the run's time); the report says so.

Writes results/gated_perplexity.{json,md,png} (``--name``). Aims (issue #10): with training, collapsing costs ≤ 3%
perplexity at k = 4 and ≤ 10% at k = 8 (no-training greedy least squares measured +0.8/+2.7/+7.6/+29% at k = 1/2/4/8).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
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
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging

import hf_layercollapse as hlc
from hf_layercollapse.collapse import model_params

HELDOUT_PLAY, CALIBRATION_PLAY = "macbeth", "hamlet"
MERGED_AFTER = "plain fine-tuning, then merged"
AIMS = {4: 3.0, 8: 10.0}  # k -> largest acceptable perplexity increase (%) from collapsing, with training


# ------------------------------------------------------------------------------------------------------ data
def windows(tokenizer, text: str, length: int, count: int | None = None) -> torch.Tensor:
    """The first ``count`` consecutive ``length``-token windows of ``text`` (all of them when ``count`` is None)."""
    ids = tokenizer(text).input_ids
    available = len(ids) // length
    count = available if count is None else count
    if count > available:
        raise ValueError(f"{count} windows of {length} tokens asked, the text has {available}")
    return torch.tensor(ids[:count * length]).view(count, length)


def load_texts(tokenizer, args) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(held-out windows, calibration windows, training examples): three disjoint sets of plays."""
    shakespeare = assets.load_shakespeare(validation_plays=(HELDOUT_PLAY, CALIBRATION_PLAY))
    plays = dict(zip(shakespeare["validation"]["play"], shakespeare["validation"]["text"]))
    heldout = windows(tokenizer, plays[HELDOUT_PLAY], args.seq_len, args.heldout_tokens // args.seq_len)
    calibration = windows(tokenizer, plays[CALIBRATION_PLAY], args.seq_len, args.calibration_tokens // args.seq_len)
    needed = args.batch_size * args.stage_steps * args.num_blocks
    pool = torch.cat([windows(tokenizer, text, args.seq_len) for text in shakespeare["train"]["text"]])
    chosen = random.Random(args.seed).sample(range(len(pool)), needed)
    train = [{"input_ids": pool[i], "labels": pool[i]} for i in chosen]
    return heldout, calibration, train


def batches(ids: torch.Tensor, size: int) -> list[dict]:
    return [{"input_ids": ids[i:i + size]} for i in range(0, len(ids), size)]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token loss) over equal-length windows (every window predicts the same number of tokens)."""
    was_training = model.training
    model.eval()
    ids = ids.to(next(model.parameters()).device)
    with active_placement().autocast():
        losses = [float(model(input_ids=b["input_ids"], labels=b["input_ids"]).loss) for b in batches(ids, batch_size)]
    model.train(was_training)
    return math.exp(sum(losses) / len(losses))


# ---------------------------------------------------------------------------------------------------- planner
def planner(base, calibration: torch.Tensor, heldout: torch.Tensor, args) -> tuple[list, list[dict]]:
    """Rank all blocks on the calibration text; merge the k cheapest with the planner's maps, no training."""
    started = time.time()
    plan = hlc.plan_collapse(base, batches(calibration, args.eval_batch), num_blocks=max(args.ks),
                             show_progress=False)
    ranked = sorted(plan.candidates, key=lambda c: c.cost)
    print(f"planner: {len(plan.candidates)} blocks measured in {time.time() - started:.0f} s; cheapest "
          f"{[(c.name, c.method, round(c.cost, 4)) for c in ranked[:max(args.ks)]]}", flush=True)
    rows = []
    for k in args.ks:
        if k == 0:
            continue
        clone = copy.deepcopy(base)
        chosen = hlc.CollapsePlan(ranked[:k], plan.candidates, plan.objective, plan.baseline, 0.0, plan.params_total)
        hlc.collapse_model(clone, plan=chosen)
        rows.append({"method": "planner", "k": k, "step": 0, "perplexity": perplexity(clone, heldout, args.eval_batch),
                     "params": model_params(clone), "blocks": [c.name for c in ranked[:k]],
                     "merges": [c.method for c in ranked[:k]]})
        print(f"planner k={k}: {rows[-1]['perplexity']:.3f}", flush=True)
    return ranked, rows


def reused_planner(args) -> tuple[list, list[dict]]:
    """The ranking and rows of an earlier run's planner (``--planner_from``), after checking its data settings."""
    if args.planner_from == args.name:
        raise SystemExit(f"--planner_from {args.planner_from}: give this run another --name (it would overwrite it)")
    earlier = json.loads((RESULTS / f"{args.planner_from}.json").read_text())
    args.planner_command = earlier["environment"]["command"]
    same = ("seq_len", "heldout_tokens", "calibration_tokens", "eval_batch", "seed", "quick")
    different = {k: (earlier["environment"]["args"].get(k), getattr(args, k)) for k in same
                 if earlier["environment"]["args"].get(k) != getattr(args, k)}
    if different:
        raise SystemExit(f"--planner_from {args.planner_from}: other data settings {different}")
    ranked = [argparse.Namespace(**{k: c[k] for k in ("name", "method", "cost", "costs")})
              for c in earlier["planner_ranking"]]
    rows = [r for r in earlier["rows"] if r["method"] == "planner" and r["k"] in args.ks]
    missing = sorted(set(args.ks) - {r["k"] for r in rows} - {0})
    if missing:
        raise SystemExit(f"--planner_from {args.planner_from}: it has no planner rows for k = {missing}")
    print(f"planner: ranking and rows reused from results/{args.planner_from}.json", flush=True)
    return ranked, rows


# ------------------------------------------------------------------------------------------------- fine-tuning
class EvaluateAt(TrainerCallback):
    """At the end of optimizer step ``S·k`` (k in ``ks``) evaluate ``measure(model, k)``."""

    def __init__(self, stage_steps: int, ks: list[int], measure) -> None:
        self.at = {stage_steps * k: k for k in ks if k > 0}
        self.measure = measure
        self.rows: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.at:
            self.rows.append({"step": state.global_step, **self.measure(model, self.at[state.global_step])})


def set_trainable(model, block_names: list[str], trainable: str) -> None:
    """What fine-tuning updates (``--trainable``): ``blocks``, the MLPs of ``block_names`` (their projections, and α
    and the target once injected); ``mlps``, every MLP of the model; ``all``, every parameter."""
    if trainable == "all":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    names = block_names if trainable == "blocks" else [b.name for b in hlc.find_mlp_blocks(model)]
    for name in names:
        model.get_submodule(name).requires_grad_(True)


def training_arguments(args, steps: int) -> TrainingArguments:
    return TrainingArguments(tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=args.batch_size,
                             learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, report_to=[],
                             save_strategy="no", disable_tqdm=True, seed=args.seed, data_seed=args.seed,
                             logging_steps=1, dataloader_num_workers=0, **active_placement().training_kwargs())


def layercollapse(base, order: list[str], calibration, train, heldout, args) -> tuple[list[dict], list[dict]]:
    """Progressive LayerCollapse over ``order`` (one stage of ``stage_steps`` per block); evaluate the collapsed
    model at the end of the stages in ``ks``."""
    model = copy.deepcopy(base)
    blocks = {b.name: b.index for b in hlc.find_mlp_blocks(model)}
    config = hlc.LayerCollapseConfig(layers_to_transform=sorted(blocks[name] for name in order),
                                     reg_weight=args.reg_weight, linear_target=args.linear_target,
                                     affine_rank=args.affine_rank)
    hlc.get_collapse_model(model, config, calibration_data=batches(calibration, args.eval_batch))
    set_trainable(model, order, args.trainable)
    assert list(hlc.injected_activations(model)) == sorted(order, key=blocks.get)

    def measure(model, k: int) -> dict:
        alphas = {name: act.alpha_value for name, act in hlc.injected_activations(model).items()}
        clone = without_autocast(copy.deepcopy(model))
        hlc.collapse_model(clone, blocks=order[:k])  # exact α = 1 on the finished blocks: no force needed
        row = {"method": "layercollapse", "k": k, "perplexity": perplexity(clone, heldout, args.eval_batch),
               "params": model_params(clone), "alphas": alphas}
        print(f"layercollapse k={k} (step {k * args.stage_steps}): {row['perplexity']:.3f}", flush=True)
        return row

    evaluate = EvaluateAt(args.stage_steps, args.ks, measure)
    collapse_args = hlc.CollapseArguments(reg_weight=args.reg_weight, alpha_learning_rate=args.alpha_lr,
                                          progressive_steps=args.stage_steps, progressive_order=",".join(order))
    trainer = hlc.LayerCollapseTrainer(model=model, args=training_arguments(args, args.stage_steps * len(order)),
                                       train_dataset=train, collapse_args=collapse_args, callbacks=[evaluate],
                                       calibration_data=batches(calibration, args.eval_batch) if args.refit_targets
                                       else None)
    trainer.remove_callback(PrinterCallback)  # α and the losses are logged every step: keep them in log_history
    trainer.train()
    return evaluate.rows, trainer.state.log_history


def merged_after_training(model, blocks: list[str], calibration, heldout, args) -> dict:
    """A copy of ``model`` with ``blocks`` replaced by their least-squares affine maps fitted on the calibration text
    (``linear_target="affine"`` at α = 1, collapsed), no training after: compressing after plain fine-tuning."""
    clone = without_autocast(copy.deepcopy(model))
    indices = {b.name: b.index for b in hlc.find_mlp_blocks(clone)}
    config = hlc.LayerCollapseConfig(layers_to_transform=sorted(indices[name] for name in blocks),
                                     linear_target="affine")
    hlc.get_collapse_model(clone, config, calibration_data=batches(calibration, args.eval_batch))
    for act in hlc.injected_activations(clone).values():
        act.alpha.data.fill_(1.0)
    hlc.collapse_model(clone)
    return {"perplexity": perplexity(clone, heldout, args.eval_batch), "params": model_params(clone)}


def plain_finetuning(base, order: list[str], calibration, train, heldout, args) -> tuple[list[dict], list[dict]]:
    """The same trainable parameters, data, steps and learning rate, no collapse; at step S·k also the fine-tuned
    model with the k blocks merged afterwards (:func:`merged_after_training`)."""
    model = copy.deepcopy(base)
    set_trainable(model, order, args.trainable)

    def measure(model, k: int) -> dict:
        row = {"method": "plain fine-tuning", "k": 0, "perplexity": perplexity(model, heldout, args.eval_batch),
               "params": model_params(model)}
        merged = merged_after_training(model, order[:k], calibration, heldout, args)
        row["merged_after"] = {"method": MERGED_AFTER, "k": k, **merged}
        print(f"plain fine-tuning step {k * args.stage_steps}: {row['perplexity']:.3f}; the {k} blocks merged "
              f"afterwards: {merged['perplexity']:.3f}", flush=True)
        return row

    evaluate = EvaluateAt(args.stage_steps, args.ks, measure)
    trainer = Trainer(model=model, args=training_arguments(args, args.stage_steps * len(order)),
                      train_dataset=train, callbacks=[evaluate])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    merged = [{"step": row["step"], **row.pop("merged_after")} for row in evaluate.rows]
    return evaluate.rows + merged, trainer.state.log_history


# ----------------------------------------------------------------------------------------------------- report
def change(value: float, reference: float) -> str:
    return f"{100 * (value / reference - 1):+.1f}%"


def summarise(original: float, base_params: int, rows: list[dict], args) -> list[dict]:
    """One line per k: each method's perplexity and its change vs the original model and vs plain fine-tuning."""
    by = {(r["method"], r["step"] if r["method"] != "planner" else r["k"]): r for r in rows}
    table = []
    for k in args.ks:
        step = k * args.stage_steps
        line = {"k": k, "params removed": "0.0%", "steps": step,
                "planner (no training)": f"{original:.2f} (+0.0%)" if k == 0 else "",
                "LayerCollapse fine-tuning": "", "plain fine-tuning": "", MERGED_AFTER: "",
                "collapse cost after training": "", "cost of merging after plain fine-tuning": ""}
        if k == 0:
            line.update({"LayerCollapse fine-tuning": f"{original:.2f} (+0.0%)",
                         "plain fine-tuning": f"{original:.2f} (+0.0%)", "collapse cost after training": "+0.0%",
                         MERGED_AFTER: f"{original:.2f} (+0.0%)", "cost of merging after plain fine-tuning": "+0.0%"})
        if ("planner", k) in by:
            p = by[("planner", k)]
            line["planner (no training)"] = f"{p['perplexity']:.2f} ({change(p['perplexity'], original)})"
            line["params removed"] = f"{100 * (1 - p['params'] / base_params):.1f}%"
        plain = by.get(("plain fine-tuning", step))
        if plain is not None:
            line["plain fine-tuning"] = f"{plain['perplexity']:.2f} ({change(plain['perplexity'], original)})"
        merged = by.get((MERGED_AFTER, step))
        if merged is not None and k > 0:
            line[MERGED_AFTER] = f"{merged['perplexity']:.2f} ({change(merged['perplexity'], original)})"
            if plain is not None:
                line["cost of merging after plain fine-tuning"] = change(merged["perplexity"], plain["perplexity"])
        ours = by.get(("layercollapse", step))
        if ours is not None:
            line["params removed"] = f"{100 * (1 - ours['params'] / base_params):.1f}%"
            line["LayerCollapse fine-tuning"] = f"{ours['perplexity']:.2f} ({change(ours['perplexity'], original)})"
            if plain is not None:
                line["collapse cost after training"] = change(ours["perplexity"], plain["perplexity"])
        table.append(line)
    return table


def verdict(rows: list[dict], args) -> list[str]:
    """Whether each aim is met: the perplexity cost of collapsing k blocks, against plain fine-tuning."""
    by = {(r["method"], r["step"]): r["perplexity"] for r in rows if r["method"] != "planner"}
    lines = []
    for k, aim in AIMS.items():
        step = k * args.stage_steps
        if ("layercollapse", step) not in by or ("plain fine-tuning", step) not in by:
            continue
        cost = 100 * (by[("layercollapse", step)] / by[("plain fine-tuning", step)] - 1)
        lines.append(f"k = {k}: collapse cost {cost:+.1f}% vs plain fine-tuning (aim ≤ {aim:.0f}%): "
                     f"{'met' if cost <= aim else 'NOT met'}")
    return lines


def plot(original: float, rows: list[dict], args, path) -> None:
    import matplotlib.ticker

    fig, ax = new_plot()
    ks = [k for k in args.ks if k > 0]
    series = {
        "planner (no training)": [r for r in rows if r["method"] == "planner"],
        "LayerCollapse fine-tuning (collapsed)": [r for r in rows if r["method"] == "layercollapse"],
        "plain fine-tuning (no collapse), same step": [r for r in rows if r["method"] == "plain fine-tuning"],
        "plain fine-tuning, then the k blocks merged": [r for r in rows if r["method"] == MERGED_AFTER],
    }
    for label, items in series.items():
        if not items:
            continue
        if label.startswith("plain fine-tuning (no"):
            points = [(r["step"] // args.stage_steps, r["perplexity"]) for r in items]
        else:
            points = [(r["k"], r["perplexity"]) for r in items]
        points = [(0, original), *sorted(p for p in points if p[0] in ks)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(original, color="grey", lw=0.8, ls=":", label="original model")
    ax.set_xlabel(f"collapsed gated MLP blocks k (LayerCollapse / plain fine-tuning: after k × {args.stage_steps} "
                  "steps)")
    ax.set_ylabel("held-out perplexity (Macbeth)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xticks([0, *ks])
    save_plot(fig, ax, "SmolLM2-135M-Instruct, Shakespeare", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--stage_steps", type=int, default=8, help="optimizer steps per progressive stage")
    parser.add_argument("--lr", type=float, default=3e-4,
                        help="learning rate of the trainable weights (and of the targets c / maps)")
    parser.add_argument("--alpha_lr", type=float, default=0.2)
    parser.add_argument("--reg_weight", type=float, default=10.0)
    parser.add_argument("--heldout_tokens", type=int, default=4096)
    parser.add_argument("--calibration_tokens", type=int, default=8192,
                        help="Hamlet tokens: the planner fits on half, measures on the other half")
    parser.add_argument("--linear_target", choices=["default", "fitted", "affine"], default="fitted",
                        help="LayerCollapseConfig.linear_target: c starts at the mean of act(gate(x)) or at its "
                             "least-squares fit, or ('affine') each block blends towards its least-squares affine "
                             "map (on the calibration text)")
    parser.add_argument("--refit_targets", action="store_true",
                        help="refit each block's target (c or affine map) on the calibration text when its stage "
                             "starts")
    parser.add_argument("--planner_from", metavar="NAME",
                        help="reuse the planner ranking and rows of results/NAME.json (same data settings)")
    parser.add_argument("--name", default="gated_perplexity", help="results/NAME.{json,md,png}")
    parser.add_argument("--affine_rank", type=int, default=None,
                        help="with --linear_target affine: train a rank-R correction of each frozen fitted map "
                             "(LayerCollapseConfig.affine_rank) instead of the full matrix")
    parser.add_argument("--trainable", choices=["blocks", "mlps", "all"], default="blocks",
                        help="what both fine-tunings update: the MLPs of the collapsed blocks, every MLP, or every "
                             "parameter")
    parser.add_argument("--eval_batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on the CPU, all on CUDA)")
    parser.add_argument("--quick", action="store_true")
    add_device_arguments(parser)
    args = parser.parse_args()
    placement = configure(parser, args)
    print(f"device: {placement.label()}", flush=True)
    if args.quick:
        args.ks, args.seq_len, args.batch_size, args.stage_steps = [0, 1, 2], 64, 2, 1
        args.heldout_tokens, args.calibration_tokens, args.eval_batch = 128, 128, 1
    args.num_blocks = max(args.ks)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    started = time.time()
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(placement.device)  # fp32 master weights
    base_params = model_params(base)
    heldout, calibration, train = load_texts(tokenizer, args)
    original = perplexity(base, heldout, args.eval_batch)
    print(f"original held-out perplexity {original:.3f}", flush=True)
    if args.planner_from:
        ranked, rows = reused_planner(args)
    else:
        ranked, rows = planner(base, calibration, heldout, args)
    order = [c.name for c in ranked[:args.num_blocks]]
    timings = {"planner_min": (time.time() - started) / 60}
    ours, ours_log = layercollapse(base, order, calibration, train, heldout, args)
    timings["layercollapse_min"] = (time.time() - started) / 60 - sum(timings.values())
    plain, plain_log = plain_finetuning(base, order, calibration, train, heldout, args)
    timings["plain_min"] = (time.time() - started) / 60 - sum(timings.values())  # with the merged copies' fits
    rows += ours + plain
    summary = summarise(original, base_params, rows, args)
    columns = ["k", "params removed", "steps", "planner (no training)", "LayerCollapse fine-tuning",
               "plain fine-tuning", MERGED_AFTER, "collapse cost after training",
               "cost of merging after plain fine-tuning"]
    table = markdown_table(summary, columns)
    verdicts = verdict(rows, args)
    print(table)
    print("\n".join(verdicts))
    if args.quick:
        return
    minutes = (time.time() - started) / 60
    env = {**environment(), "args": vars(args), "minutes": minutes, "timings": timings}
    RESULTS.mkdir(parents=True, exist_ok=True)
    planner_blocks = [{"name": c.name, "method": c.method, "cost": c.cost, "costs": c.costs} for c in ranked]
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"environment": env, "original_perplexity": original, "params_original": base_params, "order": order,
         "planner_ranking": planner_blocks, "rows": rows, "summary": summary, "verdicts": verdicts,
         "log_layercollapse": ours_log, "log_plain": plain_log}, indent=2) + "\n")
    plot(original, rows, args, RESULTS / f"{args.name}.png")
    alphas = {}
    for entry in ours_log:  # the α each block reached in its stage, before it was set to 1 (logged every step)
        for i, name in enumerate(order):
            if entry.get("step") == (i + 1) * args.stage_steps and f"alpha/{name}" in entry:
                alphas[name] = entry[f"alpha/{name}"]
    reached = ", ".join(f"{name.split('.')[-2]}: {a:.2f}" for name, a in alphas.items())
    tokens = args.batch_size * args.seq_len
    reused = (f" The planner column (and the order) is reused from `results/{args.planner_from}.json`: "
              f"`{args.planner_command}`." if args.planner_from else "")
    refit = (" Each block's target is fitted again on the calibration text when its stage starts "
             "(`--refit_targets`)." if args.refit_targets else "")
    target = {"default": "c starts at the mean of act(gate(x))", "fitted": "c starts at its least-squares fit",
              "affine": "each block blends towards its affine map (relative least squares, learnable)"
              + (f": the fit frozen, a rank-{args.affine_rank} correction learnable (affine_rank={args.affine_rank})"
                 if args.affine_rank else "")}
    trained = {"blocks": f"the MLP weights of the {args.num_blocks} blocks", "mlps": "the MLP weights of every block",
               "all": "every parameter"}
    frozen = "" if args.trainable == "all" else ", everything else frozen"
    (RESULTS / f"{args.name}.md").write_text(
        f"# Gated MLPs: held-out perplexity against collapsed blocks (SmolLM2-135M-Instruct, Shakespeare)\n\n"
        f"Command: `{env['command']}` ({minutes:.0f} min on {env['machine']}, {args.threads} torch thread of "
        f"{env['cpus']} CPUs, {placement.label()}; torch {env['torch']}, transformers {env['transformers']}).\n\n"
        f"Held-out: {len(heldout)} × {args.seq_len} tokens of Macbeth; calibration: {len(calibration)} × "
        f"{args.seq_len} tokens of Hamlet; training: windows of the other 40 texts. Budget: {args.stage_steps} "
        f"optimizer steps per block × {args.num_blocks} blocks, batch {args.batch_size} × {args.seq_len} tokens "
        f"({tokens} tokens per step), AdamW lr {args.lr} (constant), α lr {args.alpha_lr}, λ {args.reg_weight}, "
        f"{target[args.linear_target]} on the calibration text (linear_target={args.linear_target!r}), "
        f"seed {args.seed}; trainable (`--trainable {args.trainable}`): {trained[args.trainable]} (plus α and the "
        f"target for LayerCollapse){frozen}. Perplexity cells: value (change vs the original model); "
        f"collapse cost: LayerCollapse vs plain fine-tuning after the same steps; plain fine-tuning, then merged: the "
        f"plain fine-tuned model with the k blocks replaced by their least-squares affine maps fitted on the "
        f"calibration text (always affine maps, whatever `--linear_target`), no training after, and its cost vs plain "
        f"fine-tuning.{refit}{reused}\n\n"
        f"Order (the planner's ranking, cheapest first): {', '.join(n.split('.')[-2] for n in order)}. "
        f"α reached in each block's stage before it was set to 1: {reached}.\n\n{table}\n\n"
        + "\n".join(f"- {v}" for v in verdicts) + f"\n\n![perplexity against k]({args.name}.png)\n")


if __name__ == "__main__":
    main()
