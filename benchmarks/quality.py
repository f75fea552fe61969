"""Quality vs compression on the real all-MiniLM-L6-v2 and binary tweet sentiment: LayerCollapse vs baselines.

    python benchmarks/quality.py --seeds 0 1 2       # full run (about 40 minutes per seed on 2 CPU cores)
    python benchmarks/quality.py --quick             # CI smoke run: a few steps, tiny eval (not results)

Every method gets the same training budget: ``--warmup_steps`` of plain fine-tuning plus ``--stage_steps`` for
each of the 6 MLP blocks (batch 32, sequence 64, AdamW lr 1e-4).

* LayerCollapse (``blend``, ours; ``prelu``, the paper's activation), progressive as in the paper: fine-tune,
  then for k = 1..6 make the deepest remaining block collapsible, fine-tune ``--stage_steps`` with the
  regulariser (α learning rate ``--alpha_lr``), collapse it and evaluate with k blocks collapsed.
* Baselines on the plainly fine-tuned model (the whole budget, no further training), for each k:
  naive linearisation of the last k blocks (W2·W1), the calibration planner with data-aware merging
  (``plan_collapse``, 256 training tweets), dropping the last k MLPs outright, and magnitude width-pruning of
  the last k MLPs to the parameter count of their collapsed form.
Writes results/quality.{json,md} and results/quality.png (accuracy against parameters removed).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch
from common import RESULTS, environment, markdown_table
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
from transformers.utils import logging

import hf_layercollapse as hlc
from hf_layercollapse import assets

NUM_BLOCKS = 6


def encode(tokenizer, split, limit: int | None) -> list[dict]:
    texts, labels = list(split["text"]), list(split["label"])
    if limit:
        texts, labels = texts[:limit], labels[:limit]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=64)
    return [{"input_ids": torch.tensor(i), "attention_mask": torch.tensor(m), "labels": torch.tensor(y)}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]


@torch.no_grad()
def accuracy(model, data: list[dict]) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), 128):
        batch = data[i:i + 128]
        logits = model(input_ids=torch.stack([b["input_ids"] for b in batch]),
                       attention_mask=torch.stack([b["attention_mask"] for b in batch])).logits
        correct += int((logits.argmax(-1) == torch.stack([b["labels"] for b in batch])).sum())
    return correct / len(data)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train(model, data, steps: int, seed: int, trainer_cls=Trainer, **kwargs):
    args = TrainingArguments(tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=32, learning_rate=1e-4,
                             weight_decay=0.01, report_to=[], save_strategy="no", disable_tqdm=True, seed=seed,
                             data_seed=seed, use_cpu=True, logging_steps=max(steps, 1))
    trainer_cls(model=model, args=args, train_dataset=data, **kwargs).train()
    return model


def mlp_blocks(model) -> list:
    return [b for b in hlc.find_mlp_blocks(model) if b.kind is hlc.BlockKind.PLAIN]


def drop_mlps(model, k: int) -> None:
    """Remove the last k MLP blocks outright: the block adds nothing to the residual stream (its projections are
    replaced by 1-wide zero layers, so their parameters count as removed)."""
    for block in mlp_blocks(model)[-k:]:
        owner = model.get_submodule(block.name)
        fc1, fc2 = owner.get_submodule(block.layout.fc1), owner.get_submodule(block.layout.fc2)
        stub1, stub2 = nn.Linear(fc1.in_features, 1, bias=False), nn.Linear(1, fc2.out_features, bias=False)
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
        new1, new2 = nn.Linear(d_in, keep), nn.Linear(keep, d_out)
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


def layercollapse(base, train_data, test, args, seed: int, activation: str) -> list[dict]:
    model = train(copy.deepcopy(base), train_data, args.warmup_steps, seed)
    method = f"layercollapse-{activation}"
    rows = [{"method": method, "k": 0, "accuracy": accuracy(model, test), "params": params(model)}]
    collapse_args = hlc.CollapseArguments(alpha_learning_rate=args.alpha_lr, reg_weight=args.reg_weight)
    for k in range(1, NUM_BLOCKS + 1):
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[-1], activation=activation))
        train(model, train_data, args.stage_steps, seed + k, hlc.LayerCollapseTrainer, collapse_args=collapse_args)
        alpha = next(iter(hlc.injected_activations(model).values())).alpha_value
        hlc.collapse_model(model, blocks=list(hlc.injected_activations(model)), force=True)
        rows.append({"method": f"layercollapse-{activation}", "k": k, "accuracy": accuracy(model, test),
                     "params": params(model), "alpha_at_collapse": alpha})
    return rows


def baselines(base, train_data, test, calibration, args, seed: int) -> list[dict]:
    model = train(copy.deepcopy(base), train_data, args.warmup_steps + NUM_BLOCKS * args.stage_steps, seed)
    rows = [{"method": "plain fine-tuning", "k": 0, "accuracy": accuracy(model, test), "params": params(model)}]
    full_plan = hlc.plan_collapse(model, calibration, num_blocks=NUM_BLOCKS, show_progress=False)
    ranked = sorted(full_plan.candidates, key=lambda c: c.cost)
    for k in range(1, NUM_BLOCKS + 1):
        for name, method in (("naive linearise", naive), ("drop MLP", drop_mlps), ("width prune", width_prune)):
            clone = copy.deepcopy(model)
            method(clone, k)
            rows.append({"method": name, "k": k, "accuracy": accuracy(clone, test), "params": params(clone)})
        clone = copy.deepcopy(model)  # the planner's k cheapest blocks (costs measured once, one block at a time)
        plan = hlc.CollapsePlan(ranked[:k], full_plan.candidates, full_plan.objective, full_plan.baseline, 0.0,
                                full_plan.params_total)
        hlc.collapse_model(clone, plan=plan)
        rows.append({"method": "planner (data-aware)", "k": k, "accuracy": accuracy(clone, test),
                     "params": params(clone)})
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
                    "params removed": f"{100 * (1 - items[0]['params'] / base_params):.1f}%", "seeds": len(items)})
    return out


def plot(rows: list[dict], base_params: int, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    ax.set_title("all-MiniLM-L6-v2, binary tweet sentiment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--stage_steps", type=int, default=50)
    parser.add_argument("--alpha_lr", type=float, default=0.05)
    parser.add_argument("--reg_weight", type=float, default=1.0)
    parser.add_argument("--train_size", type=int, default=None)
    parser.add_argument("--test_size", type=int, default=1000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.warmup_steps, args.stage_steps, args.train_size, args.test_size = 1, 1, 64, 32
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    tweets = assets.load_tweets(binary=True, seed=0, test_size=1000)
    train_data = encode(tokenizer, tweets["train"], args.train_size)
    test = encode(tokenizer, tweets["test"], args.test_size)
    calibration_rows = train_data[:256] if not args.quick else train_data[:16]
    calibration = [{k: torch.stack([r[k] for r in calibration_rows[i:i + 32]]) for k in calibration_rows[0]}
                   for i in range(0, len(calibration_rows), 32)]
    rows, started = [], time.time()
    for seed in args.seeds:
        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
        base_params = params(base)
        rows += baselines(base, train_data, test, calibration, args, seed)
        for activation in ("blend", "prelu"):
            rows += layercollapse(base, train_data, test, args, seed, activation)
    summary = summarise(rows, base_params)
    table = markdown_table(summary, ["method", "k", "accuracy", "params removed", "seeds"])
    print(table)
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {**environment(), "args": vars(args), "minutes": (time.time() - started) / 60}
    (RESULTS / "quality.json").write_text(json.dumps({"environment": env, "rows": rows, "summary": summary},
                                                     indent=2) + "\n")
    plot(rows, base_params, RESULTS / "quality.png")
    (RESULTS / "quality.md").write_text(
        f"# Quality vs compression (all-MiniLM-L6-v2, binary tweets)\n\nCommand: `{env['command']}` "
        f"({env['minutes']:.0f} min on {env['machine']}, {env['cpus']} CPUs). Test set: {len(test)} tweets; "
        f"budget: {args.warmup_steps} + 6 × {args.stage_steps} steps of batch 32.\n\n{table}\n\n"
        "![accuracy vs parameters removed](quality.png)\n")


if __name__ == "__main__":
    main()
