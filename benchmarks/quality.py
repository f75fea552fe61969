"""Quality vs compression on the real all-MiniLM-L6-v2 and binary tweet sentiment: LayerCollapse vs baselines.

    python benchmarks/quality.py --seeds 0 1 2       # full run (about 25 minutes per seed on one CPU core)
    python benchmarks/quality.py --quick             # CI smoke run: a few steps, tiny eval (not results)
    python benchmarks/quality.py --device cuda --dtype bfloat16 --name quality_gpu   # on a GPU, bf16 mixed precision

Seeds can run in separate processes and be merged (the result files record every run's command):

    python benchmarks/quality.py --seeds 0 --name quality_s0 & python benchmarks/quality.py --seeds 1 --name quality_s1
    python benchmarks/quality.py --merge quality_s0 quality_s1      # writes results/quality.{json,md,png}

Every method at k collapsed blocks has had exactly the same training: the same optimizer steps, data order, batch
32 (grouped by length), AdamW lr 1e-4 with linear decay over ``--warmup_steps + 6·--stage_steps +
--recovery_steps`` steps. Checkpoint k is the step ``warmup + k·stage`` (k = 0…5) and the last step (k = 6).

* LayerCollapse (``blend``, ours; ``prelu``, the paper's activation): ONE ``LayerCollapseTrainer`` run with the
  progressive schedule (``CollapseArguments.progressive_steps``): every block is injected, the deepest block is
  regularised alone for a stage and then held linear, then the next; at checkpoint k a copy with the k finished
  blocks collapsed (``collapse_model``) is evaluated. The recovery steps adapt the all-linear model.
  ``--linear_target fitted``: the blend goes towards each channel's least-squares line fitted on the 256
  calibration tweets instead of the identity (``LayerCollapseConfig(linear_target="fitted")``); with
  ``--refit_targets`` each block's line is fitted again when its stage starts, on the model as fine-tuning left it
  (``LayerCollapseTrainer(calibration_data=...)``). ``--linear_target affine``: each block blends towards its
  least-squares affine map (``LayerCollapseConfig(linear_target="affine")``, the planner's merge, learnable).
  ``--order planned``: the stages follow the planner's ranking of the blocks after the warm-up steps.
* Plain fine-tuning: one ``Trainer`` run with the same schedule; at checkpoint k the uncompressed model is evaluated
  (the reference at equal training) and, on copies of it, the baselines for the last k blocks: naive
  linearisation (W2·W1), the calibration planner with data-aware merging (``plan_collapse`` on 256 training tweets,
  its k cheapest blocks), dropping the MLPs outright, and magnitude width-pruning of the MLPs to the parameter
  count of their collapsed form.
``--device`` / ``--dtype``: the Trainer's device and mixed precision (fp32 master weights); the evaluations run under
the same autocast, the library's calibration and merges in fp32. Writes results/quality.{json,md} and
results/quality.png (accuracy against parameters removed).
"""

from __future__ import annotations

import argparse
import copy
import json
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
    describe,
    environment,
    markdown_table,
    new_plot,
    save_plot,
    without_autocast,
)
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging

import hf_layercollapse as hlc
from hf_layercollapse.collapse import model_params

NUM_BLOCKS = 6


def encode(tokenizer, split, limit: int | None) -> list[dict]:
    texts, labels = list(split["text"]), list(split["label"])
    if limit:
        texts, labels = texts[:limit], labels[:limit]
    enc = tokenizer(texts, truncation=True, max_length=64)
    return [{"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]


@torch.no_grad()
def accuracy(model, batches: list[dict]) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for batch in batches:
        with active_placement().autocast():
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
        correct += int((logits.argmax(-1) == batch["labels"].to(device)).sum())
        total += len(batch["labels"])
    return correct / total


def length_batches(collator, data: list[dict], size: int) -> list[dict]:
    """Padded batches of examples sorted by length (evaluation and calibration: less padding, same result)."""
    ordered = sorted(data, key=lambda r: len(r["input_ids"]))
    return [collator(ordered[i:i + size]) for i in range(0, len(ordered), size)]


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train(model, data, collator, args, seed: int, callback: TrainerCallback, trainer_cls=Trainer, **kwargs):
    steps = args.warmup_steps + NUM_BLOCKS * args.stage_steps + args.recovery_steps
    training = TrainingArguments(tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=32,
                                 learning_rate=1e-4, weight_decay=0.01, report_to=[], save_strategy="no",
                                 disable_tqdm=True, seed=seed, data_seed=seed, logging_steps=steps,
                                 train_sampling_strategy="group_by_length", **active_placement().training_kwargs())
    trainer_cls(model=model, args=training, train_dataset=data, data_collator=collator, callbacks=[callback],
                **kwargs).train()
    return model


class AtCheckpoints(TrainerCallback):
    """Calls ``measure(model, k)`` at checkpoint k: step warmup + k·stage (k < 6) and the last step (k = 6)."""

    def __init__(self, model, args, measure, order: list[str] | None = None) -> None:
        self.model, self.measure, self.order = model, measure, order
        self.steps = {args.warmup_steps + k * args.stage_steps: k for k in range(NUM_BLOCKS)}
        self.steps[args.warmup_steps + NUM_BLOCKS * args.stage_steps + args.recovery_steps] = NUM_BLOCKS
        self.stage_ends = {args.warmup_steps + k * args.stage_steps: k for k in range(1, NUM_BLOCKS + 1)}
        self.alpha_before_hold: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        k = self.stage_ends.get(state.global_step + 1)  # the next step ends stage k: α of its block before the hold
        if k and self.order:
            self.alpha_before_hold[k] = hlc.injected_activations(self.model)[self.order[k - 1]].alpha_value
        if state.global_step in self.steps:
            was_training = self.model.training
            with torch.random.fork_rng():  # measuring (new layers, pruning) must not change the dropout masks to come
                self.measure(self.model, self.steps[state.global_step])
            self.model.train(was_training)


def mlp_blocks(model) -> list:
    return [b for b in hlc.find_mlp_blocks(model) if b.kind is hlc.BlockKind.PLAIN]


def drop_mlps(model, k: int) -> None:
    """Remove the last k MLP blocks outright: the block adds nothing to the residual stream (its projections are
    replaced by 1-wide zero layers, so their parameters count as removed)."""
    for block in mlp_blocks(model)[-k:]:
        owner = model.get_submodule(block.name)
        fc1, fc2 = owner.get_submodule(block.layout.fc1), owner.get_submodule(block.layout.fc2)
        stub1 = nn.Linear(fc1.in_features, 1, bias=False).to(fc1.weight)
        stub2 = nn.Linear(1, fc2.out_features, bias=False).to(fc1.weight)
        nn.init.zeros_(stub1.weight)
        nn.init.zeros_(stub2.weight)
        setattr_path(owner, block.layout.fc1, stub1)
        setattr_path(owner, block.layout.fc2, stub2)


def width_prune(model, k: int) -> None:
    """Keep, in each of the last k MLPs, the intermediate neurons with the largest ‖w1_i‖·‖w2_i‖, as many as make
    the block as large as its collapsed form (d·d + d parameters)."""
    for block in mlp_blocks(model)[-k:]:
        owner = model.get_submodule(block.name)
        fc1, fc2 = owner.get_submodule(block.layout.fc1), owner.get_submodule(block.layout.fc2)
        d_in, d_out = fc1.in_features, fc2.out_features
        keep = max(1, round((d_in * d_out) / (d_in + d_out + 1)))
        score = fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0)
        index = score.topk(keep).indices.sort().values
        new1, new2 = nn.Linear(d_in, keep).to(fc1.weight), nn.Linear(keep, d_out).to(fc1.weight)
        with torch.no_grad():
            new1.weight.copy_(fc1.weight[index])
            new1.bias.copy_(fc1.bias[index])
            new2.weight.copy_(fc2.weight[:, index])
            new2.bias.copy_(fc2.bias)
        setattr_path(owner, block.layout.fc1, new1)
        setattr_path(owner, block.layout.fc2, new2)


def setattr_path(root, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def naive(model, k: int) -> None:
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=list(range(-k, 0))))
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    hlc.collapse_model(model)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def planned_order(base, train_data, collator, calibration, args, seed: int) -> list[str]:
    """The planner's ranking (cheapest first) of the MLP blocks after the warm-up steps: the same training as the
    LayerCollapse run's warm-up (its blocks are held at α = 0 until then), stopped there."""
    model = copy.deepcopy(base)
    train(model, train_data, collator, args, seed, StopAt(args.warmup_steps))
    plan = hlc.plan_collapse(without_autocast(model).eval(), calibration, num_blocks=1, show_progress=False)
    return [c.name for c in sorted(plan.candidates, key=lambda c: c.cost)]


def layercollapse(base, train_data, collator, test, calibration, args, seed: int, activation: str,
                  order: list[str] | None = None) -> list[dict]:
    target = args.linear_target if activation == "blend" else "default"
    fitted = target != "default"
    rank = args.affine_rank if target == "affine" else None
    config = hlc.LayerCollapseConfig(activation=activation, linear_target=target, affine_rank=rank)
    model = hlc.get_collapse_model(copy.deepcopy(base).to(active_placement().device), config,
                                   calibration_data=calibration if fitted else None)
    refit = fitted and args.refit_targets
    method = (f"layercollapse-{activation}" + (f"-{target}" if fitted else "") + (f"-r{rank}" if rank else "")
              + ("-refit" if refit else "") + ("-planned" if order else ""))
    target_trainable = sum(p.numel() for act in hlc.injected_activations(model).values()
                           for p in act.target_parameters())
    rows = []
    order = order or list(hlc.injected_activations(model))[::-1]  # deepest first

    def measure(model, k: int) -> None:
        clone = without_autocast(copy.deepcopy(model))
        if k:  # the first k blocks of the order finished their stages: α = 1 exactly
            hlc.collapse_model(clone, blocks=order[:k])
        rows.append({"method": method, "k": k, "seed": seed, "accuracy": accuracy(clone, test),
                     # the architecture's own parameters: α and the blocks' targets (c, affine maps) are not counted
                     "params": model_params(clone), "alpha_before_hold": callback.alpha_before_hold.get(k),
                     "target_trainable": target_trainable})
        print(rows[-1], flush=True)

    callback = AtCheckpoints(model, args, measure, order)
    collapse_args = hlc.CollapseArguments(alpha_learning_rate=args.alpha_lr, reg_weight=args.reg_weight,
                                          progressive_steps=args.stage_steps, progressive_start=args.warmup_steps,
                                          progressive_order=",".join(order))
    train(model, train_data, collator, args, seed, callback, hlc.LayerCollapseTrainer, collapse_args=collapse_args,
          calibration_data=calibration if refit else None)
    return rows


def baselines(base, train_data, collator, test, calibration, args, seed: int) -> list[dict]:
    rows = []

    def measure(model, k: int) -> None:
        new = [{"method": "plain fine-tuning", "k": k, "accuracy": accuracy(model, test), "params": params(model)}]
        if k:
            for name, method in (("naive linearise", naive), ("drop MLP", drop_mlps), ("width prune", width_prune)):
                clone = without_autocast(copy.deepcopy(model))
                method(clone, k)
                new.append({"method": name, "k": k, "accuracy": accuracy(clone, test), "params": params(clone)})
            clone = without_autocast(copy.deepcopy(model)).eval()
            plan = hlc.plan_collapse(clone, calibration, num_blocks=k, show_progress=False)
            hlc.collapse_model(clone, plan=plan)
            new.append({"method": "planner (data-aware)", "k": k, "accuracy": accuracy(clone, test),
                        "params": params(clone)})
        for row in new:
            row["seed"] = seed
            print(row, flush=True)
        rows.extend(new)

    model = copy.deepcopy(base)
    train(model, train_data, collator, args, seed, AtCheckpoints(model, args, measure))
    return rows


def summarise(rows: list[dict], base_params: int) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["k"]), []).append(r)
    out = []
    for (method, k), items in sorted(groups.items(), key=lambda x: (x[0][0], x[0][1])):
        accs = [i["accuracy"] for i in items]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        out.append({"method": method, "k": k, "accuracy": f"{100 * statistics.mean(accs):.2f} ± {100 * spread:.2f}",
                    "params removed": f"{round(100 * (1 - items[0]['params'] / base_params), 1) + 0.0:.1f}%",
                    "seeds": len(items)})
    return out


def plot(rows: list[dict], base_params: int, path) -> None:
    fig, ax = new_plot()
    methods = sorted({r["method"] for r in rows})
    for method in methods:
        points = sorted({(r["k"], r["params"]) for r in rows if r["method"] == method})
        xs, ys = [], []
        for k, p in points:
            accs = [r["accuracy"] for r in rows if r["method"] == method and r["k"] == k]
            xs.append(100 * (1 - p / base_params))
            ys.append(100 * statistics.mean(accs))
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("test accuracy (%)")
    save_plot(fig, ax, "all-MiniLM-L6-v2, binary tweet sentiment", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--warmup_steps", type=int, default=60)
    parser.add_argument("--stage_steps", type=int, default=30)
    parser.add_argument("--recovery_steps", type=int, default=60)
    parser.add_argument("--alpha_lr", type=float, default=0.05)
    parser.add_argument("--reg_weight", type=float, default=1.0)
    parser.add_argument("--train_size", type=int, default=None)
    parser.add_argument("--test_size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default 1 on the CPU: leaves a core to other work; every core on CUDA)")
    parser.add_argument("--methods", nargs="+", default=["baselines", "blend", "prelu"],
                        choices=["baselines", "blend", "prelu"])
    parser.add_argument("--linear_target", choices=["default", "fitted", "affine"], default="default",
                        help="LayerCollapseConfig.linear_target of the blend runs ('fitted': per-channel lines, "
                             "'affine': each block's least-squares affine map, fitted on the 256 calibration tweets)")
    parser.add_argument("--affine_rank", type=int, default=None,
                        help="with --linear_target affine: train a rank-R correction of each frozen fitted map "
                             "(LayerCollapseConfig.affine_rank) instead of the full matrix")
    parser.add_argument("--refit_targets", action="store_true",
                        help="with --linear_target fitted/affine: refit each block's target when its stage starts")
    parser.add_argument("--order", choices=["deepest_first", "planned"], default="deepest_first",
                        help="LayerCollapse stage order: the paper's, or the planner's ranking after the warm-up")
    parser.add_argument("--quick", action="store_true")
    add_device_arguments(parser)
    parser.add_argument("--name", default="quality", help="results/NAME.{json,md,png}")
    parser.add_argument("--merge", nargs="+", metavar="NAME", help="merge results/NAME.json files into --name")
    parser.add_argument("--combine", nargs="+", metavar="NAME",
                        help="plot and tabulate the methods of several results/NAME.json runs (same schedule and "
                             "seeds, other methods or settings) together as --name")
    args = parser.parse_args()
    if args.merge:
        merge(args)
        return
    if args.combine:
        combine(args)
        return
    if args.refit_targets and args.linear_target == "default":
        parser.error("--refit_targets refits the fitted targets: it needs --linear_target fitted or affine")
    placement = configure(parser, args)
    print(f"device: {placement.label()}", flush=True)
    if args.quick:
        args.warmup_steps, args.stage_steps, args.recovery_steps, args.train_size, args.test_size = 1, 1, 1, 64, 32
    torch.set_num_threads(args.threads)
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    collator = DataCollatorWithPadding(tokenizer)
    tweets = assets.load_tweets(binary=True, seed=0, test_size=1000)
    train_data = encode(tokenizer, tweets["train"], args.train_size)
    test = length_batches(collator, encode(tokenizer, tweets["test"], args.test_size), 128)
    calibration = length_batches(collator, train_data[:256] if not args.quick else train_data[:16], 32)
    calibration = [{k: v for k, v in b.items() if k != "labels"} for b in calibration]
    rows, started = [], time.time()
    for seed in args.seeds:
        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
        base_params = params(base)
        if "baselines" in args.methods:
            rows += baselines(base, train_data, collator, test, calibration, args, seed)
        order = planned_order(base, train_data, collator, calibration, args, seed) if args.order == "planned" else None
        if order:
            print({"seed": seed, "planned order": order}, flush=True)
        for activation in ("blend", "prelu"):
            if activation in args.methods:
                rows += layercollapse(base, train_data, collator, test, calibration, args, seed, activation, order)
        write(rows, base_params, args, started)  # after every seed: a long run that is stopped keeps its seeds


def write(rows: list[dict], base_params: int, args, started: float, runs: list[dict] | None = None) -> None:
    summary = summarise(rows, base_params)
    table = markdown_table(summary, ["method", "k", "accuracy", "params removed", "seeds"])
    print(table, flush=True)
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["seed"] for r in rows})
    env = {**environment(), "args": vars(args), "seeds_done": seeds, "minutes": (time.time() - started) / 60}
    if runs:
        env["runs"] = runs
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"environment": env, "rows": rows, "summary": summary},
                                                          indent=2) + "\n")
    plot(rows, base_params, RESULTS / f"{args.name}.png")
    steps = args.warmup_steps + NUM_BLOCKS * args.stage_steps + args.recovery_steps
    commands = "; ".join(f"`{r['command']}` (seeds {r['seeds_done']} done, {r['minutes']:.0f} min)"
                         for r in runs) + f", merged by `{env['command']}`" if runs else (
        f"`{env['command']}` ({env['minutes']:.0f} min)")
    (RESULTS / f"{args.name}.md").write_text(
        f"# Quality vs compression (all-MiniLM-L6-v2, binary tweets)\n\nCommand: {commands} on {env['machine']}, "
        f"{env['cpus']} CPUs, {args.threads} torch thread per run, {describe(args.device, args.dtype, env.get('gpu'))}"
        f"; seeds done: {seeds}. Test set: {args.test_size} tweets. Training: {steps} steps of batch 32 for every "
        f"method; checkpoint k at step "
        f"{args.warmup_steps} + k × {args.stage_steps} (k = 6: step {steps}); accuracy mean ± standard deviation "
        f"over seeds.\n\n{table}\n\n![accuracy vs parameters removed]({args.name}.png)\n")


def merge(args) -> None:
    """Combine the rows of several runs (different seeds, same settings) into results/<--name>.*."""
    loaded = [json.loads((RESULTS / f"{name}.json").read_text()) for name in args.merge]
    defaults = {"methods": ["baselines", "blend", "prelu"], "order": "deepest_first",  # runs from before these
                "linear_target": "default", "refit_targets": False,  # options existed ran them all, in this
                "device": "cpu", "dtype": "float32"}  # order, with this target and no refit, on the CPU in fp32
    settings = [{**defaults, **{k: v for k, v in item["environment"]["args"].items()
                                if k not in ("seeds", "name", "merge", "combine")}} for item in loaded]
    if any(s != settings[0] for s in settings):
        raise SystemExit(f"--merge: the runs used different settings: {settings}")
    rows = [row for item in loaded for row in item["rows"]]
    seeds = [(row["method"], row["seed"]) for item in loaded for row in item["rows"] if row["k"] == 0]
    if len(seeds) != len(set(seeds)):
        raise SystemExit(f"--merge: a seed appears twice: {sorted(seeds)}")
    for key, value in settings[0].items():
        setattr(args, key, value)
    runs = [{"command": item["environment"]["command"], "minutes": item["environment"]["minutes"],
             "seeds_done": item["environment"]["seeds_done"]} for item in loaded]
    base_params = min(r["params"] for r in rows if r["k"] == 0)  # the uncompressed model (without α)
    write(rows, base_params, args, time.time(), runs)


SCHEDULE = ("warmup_steps", "stage_steps", "recovery_steps", "train_size", "test_size")


def combine(args) -> None:
    """One table (mean accuracy per method and k) and one plot of several runs' methods: the headline figure."""
    loaded = {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in args.combine}
    schedules = {name: {k: item["environment"]["args"].get(k) for k in SCHEDULE} for name, item in loaded.items()}
    seeds = {name: item["environment"]["seeds_done"] for name, item in loaded.items()}
    differ = len({json.dumps(s, sort_keys=True) for s in schedules.values()}) > 1
    if differ or len({str(s) for s in seeds.values()}) > 1:
        raise SystemExit(f"--combine: the runs differ in schedule or seeds: {schedules} {seeds}")
    rows = [row for item in loaded.values() for row in item["rows"]]
    base_params = min(r["params"] for r in rows if r["k"] == 0)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ks = sorted({r["k"] for r in rows if r["k"]})
    table_rows = []
    for method in methods:
        row = {"method": method}
        for k in ks:
            accs = [r["accuracy"] for r in rows if r["method"] == method and r["k"] == k]
            row[f"k={k}"] = f"{100 * statistics.mean(accs):.1f}" if accs else ""
        table_rows.append(row)
    table = markdown_table(table_rows, ["method"] + [f"k={k}" for k in ks])
    paired = markdown_table(paired_rows(rows, methods, ks), ["method"] + [f"k={k}" for k in ks])
    print(table)
    print(paired)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, base_params, RESULTS / f"{args.name}.png")
    sources = ", ".join(f"[{name}.md]({name}.md)" for name in args.combine)
    command = environment()["command"]
    (RESULTS / f"{args.name}.md").write_text(
        f"# Quality vs compression: the methods together (all-MiniLM-L6-v2, binary tweets)\n\nCommand: `{command}`, "
        f"from {sources} (their commands, spreads and machines are recorded there); seeds {seeds[args.combine[0]]}. "
        f"Mean test accuracy (%) over the seeds at k collapsed MLP blocks; at checkpoint k every method has had the "
        f"same training steps.\n\n{table}\n\nPaired by seed (the same seed gives every method the same head "
        f"initialisation and data order; the test tweets are the same for every seed): each LayerCollapse run minus "
        f"the best baseline at that k (the best mean among the methods "
        f"compressing after plain fine-tuning), in accuracy points, mean ± standard error over the seeds, and which "
        f"baseline that is.\n\n{paired}\n\n![accuracy vs parameters removed]({args.name}.png)\n")


def paired_rows(rows: list[dict], methods: list[str], ks: list[int]) -> list[dict]:
    """Per LayerCollapse method and k: mean ± standard error over seeds of (its accuracy − the best baseline's)."""
    accuracy = {(r["method"], r["k"], r["seed"]): r["accuracy"] for r in rows}
    baselines = [m for m in methods if not m.startswith("layercollapse") and m != "plain fine-tuning"]
    table = []
    for method in (m for m in methods if m.startswith("layercollapse")):
        line = {"method": method}
        for k in ks:
            seeds = sorted(s for m, kk, s in accuracy if m == method and kk == k)
            candidates = [b for b in baselines if all((b, k, s) in accuracy for s in seeds)]
            if len(seeds) < 2 or not candidates:
                line[f"k={k}"] = ""
                continue
            best = max(candidates, key=lambda b: statistics.mean(accuracy[(b, k, s)] for s in seeds))
            diffs = [100 * (accuracy[(method, k, s)] - accuracy[(best, k, s)]) for s in seeds]
            error = statistics.stdev(diffs) / len(diffs) ** 0.5
            line[f"k={k}"] = f"{statistics.mean(diffs):+.2f} ± {error:.2f} ({best})"
        table.append(line)
    return table


if __name__ == "__main__":
    main()
