#!/usr/bin/env python
"""LoRA + LayerCollapse: fine-tune a classifier with LoRA adapters and the α of LayerCollapse while every base
weight stays frozen, then merge LoRA, collapse the blocks whose α reached 1, and save one compact checkpoint.

Runs offline on the embedded assets: all-MiniLM-L6-v2 (``offline_assets.minilm_path()``) on the binary
tweet sentiment corpus (``offline_assets.load_tweets()``), evaluated on a fixed test split.

The story:

1. ``hlc.get_lora_collapse_model(model, LoraConfig(...), LayerCollapseConfig(...))``: LoRA on the attention and MLP
   projections, one α per selected MLP block, a new classification head (``modules_to_save``); the base is frozen.
2. ``LayerCollapseTrainer`` trains LoRA, α and the head (α pulled towards 1 by λ·Σ(1−α)²).
3. ``peft_model.save_pretrained(output_dir/adapter)``: the PEFT adapter (LoRA + α + head), a few MB.
4. ``hlc.merge_lora_and_collapse(peft_model)``: LoRA merged into the weights first, then the blocks with
   ``|1−α| ≤ τ`` collapsed into one projection each; ``save_pretrained(output_dir/collapsed)``.
5. ``AutoModelForSequenceClassification.from_pretrained(output_dir/collapsed)`` and evaluate again.

It prints (and writes to ``output_dir/lora_collapse_results.json``) the trainable parameters, the peak memory of
training, and the accuracy before training, after training (LoRA + α, uncollapsed), after collapsing, and after
reloading. Default run (about 4 minutes on 2 CPU cores)::

    python examples/run_lora_collapse.py --output_dir outputs/lora_collapse

Shorter smoke run::

    python examples/run_lora_collapse.py --output_dir /tmp/lora_collapse --max_steps 10 --train_size 320 --eval_size 200
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import offline_assets as assets
import torch
from metrics import load_metric
from peft import LoraConfig
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

import hf_layercollapse as hlc

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/lora_collapse")
    parser.add_argument("--model_name_or_path", default=None, help="Default: the embedded all-MiniLM-L6-v2.")
    parser.add_argument("--max_steps", type=int, default=120)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--eval_size", type=int, default=1000, help="Tweets in the fixed test split.")
    parser.add_argument("--train_size", type=int, default=None, help="Use only this many training tweets (smoke runs).")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="LoRA and head learning rate.")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=32)
    parser.add_argument("--lora_targets", nargs="+", default=["query", "value", "intermediate.dense", "output.dense"],
                        help="LoRA target modules (names or suffixes; 'output.dense' also matches attention.output).")
    parser.add_argument("--layers_to_transform", type=int, nargs="+", default=[-3, -2, -1],
                        help="MLP blocks to make collapsible (negative: from the end).")
    parser.add_argument("--reg_weight", type=float, default=1.0, help="λ of λ·Σ(1−α)².")
    parser.add_argument("--reg_warmup_ratio", type=float, default=0.3, help="λ grows linearly over this fraction.")
    parser.add_argument("--alpha_learning_rate", type=float, default=0.05)
    parser.add_argument("--threshold", type=float, default=0.05, help="τ: collapse a block when |1−α| ≤ τ.")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- memory


def _read_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory() -> None:
    """Reset the peak counters: CUDA's, and Linux's peak resident set size (``VmHWM``, via ``clear_refs``)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mib(rss_before: int | None = None) -> dict[str, float | None]:
    """Peak process memory since :func:`reset_peak_memory` (CPU: peak RSS, and its rise over ``rss_before`` KiB;
    CUDA: max allocated), in MiB."""
    hwm = _read_status_kib("VmHWM")
    return {
        "peak_rss_mib": None if hwm is None else round(hwm / 1024, 1),
        "rss_before_mib": None if rss_before is None else round(rss_before / 1024, 1),
        "peak_rss_increase_mib": None if hwm is None or rss_before is None else round((hwm - rss_before) / 1024, 1),
        "cuda_max_allocated_mib": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                                   if torch.cuda.is_available() else None),
    }


def folder_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)


# ---------------------------------------------------------------------------------------------- evaluation


def accuracy(model: torch.nn.Module, dataset, collator, batch_size: int = 128) -> float:
    """Accuracy of ``model`` on ``dataset`` (tokenized, with ``labels``), with the offline accuracy metric."""
    metric = load_metric("accuracy")
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            labels = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            metric.add_batch(predictions=logits.argmax(-1).cpu(), references=labels)
    return float(metric.compute()["accuracy"])


def trainable_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters per kind: LoRA, α, modules trained in full (the head), anything else."""
    counts = {"lora": 0, "alpha": 0, "head": 0, "other": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            kind = ("lora" if ".lora_" in name else "alpha" if "layercollapse_alpha" in name
                    else "head" if ".modules_to_save." in name else "other")
            counts[kind] += param.numel()
    return counts


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    model_path = args.model_name_or_path or str(assets.minilm_path())

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tweets = assets.load_tweets(binary=True, seed=args.seed, test_size=args.eval_size)
    if args.train_size is not None:
        tweets["train"] = tweets["train"].select(range(min(args.train_size, tweets["train"].num_rows)))
    tokenized = tweets.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_seq_length),
                           batched=True, remove_columns=["text"]).rename_column("label", "labels")
    collator = DataCollatorWithPadding(tokenizer)

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    total_params = sum(p.numel() for p in model.parameters())
    results: dict[str, Any] = {"model": model_path, "train_rows": tokenized["train"].num_rows,
                               "eval_rows": tokenized["test"].num_rows, "args": vars(args)}
    results["accuracy_before_training"] = accuracy(model, tokenized["test"], collator)

    # 1. LoRA + LayerCollapse: frozen base, trainable LoRA + α + head, all in one PEFT adapter
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05, target_modules=args.lora_targets,
                      task_type="SEQ_CLS")
    collapse = hlc.LayerCollapseConfig(layers_to_transform=args.layers_to_transform, reg_weight=args.reg_weight,
                                       threshold=args.threshold)
    peft_model = hlc.get_lora_collapse_model(model, lora, collapse)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    results["params"] = {"model": total_params, "trainable": trainable,
                         "trainable_percent": round(100 * trainable / total_params, 3),
                         **{f"trainable_{k}": v for k, v in trainable_breakdown(peft_model).items()}}
    logger.info("trainable parameters: %s", results["params"])

    # 2. training: LoRA, α and the head move; the base weights do not
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=0.1, weight_decay=0.01, logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to="none", dataloader_pin_memory=False, seed=args.seed,
        disable_tqdm=True,
    )
    collapse_args = hlc.CollapseArguments(reg_schedule="linear", reg_warmup_ratio=args.reg_warmup_ratio,
                                          alpha_learning_rate=args.alpha_learning_rate)
    trainer = hlc.LayerCollapseTrainer(model=peft_model, args=training_args, train_dataset=tokenized["train"],
                                       data_collator=collator, collapse_args=collapse_args)
    reset_peak_memory()
    rss_before = _read_status_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    results["train_seconds"] = round(time.perf_counter() - start, 1)
    # CPU seconds of all threads: divided by the core count, the wall time on an otherwise idle machine
    results["train_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    results["training_peak_memory"] = peak_memory_mib(rss_before)
    results["alphas"] = {name: round(act.alpha_value, 4) for name, act in hlc.injected_activations(peft_model).items()}
    results["accuracy_lora_alpha"] = accuracy(peft_model, tokenized["test"], collator)

    # 3. the PEFT adapter: LoRA + α + head, small; it reloads with PeftModel/AutoPeftModel.from_pretrained
    peft_model.save_pretrained(output_dir / "adapter")
    results["adapter_mib"] = folder_mib(output_dir / "adapter")

    # 4. merge LoRA, then collapse the blocks within τ; one plain transformers checkpoint
    merged, report = hlc.merge_lora_and_collapse(peft_model, return_report=True)
    logger.info("collapse report:\n%s", report)
    results["collapse"] = {"collapsed_blocks": len(report.collapsed), "params_before": report.model_params_before,
                           "params_after": report.model_params_after, "params_saved": report.params_saved}
    results["accuracy_collapsed"] = accuracy(merged, tokenized["test"], collator)
    merged.save_pretrained(output_dir / "collapsed")
    tokenizer.save_pretrained(output_dir / "collapsed")
    results["collapsed_checkpoint_mib"] = folder_mib(output_dir / "collapsed")

    # 5. reload with plain transformers
    reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir / "collapsed")
    results["accuracy_reloaded"] = accuracy(reloaded, tokenized["test"], collator)

    (output_dir / "lora_collapse_results.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = {k: results[k] for k in ("accuracy_before_training", "accuracy_lora_alpha", "accuracy_collapsed",
                                       "accuracy_reloaded", "train_seconds", "train_cpu_seconds", "adapter_mib",
                                       "collapsed_checkpoint_mib")}
    print(json.dumps({**summary, "params": results["params"], "collapse": results["collapse"],
                      "training_peak_memory": results["training_peak_memory"], "alphas": results["alphas"]}, indent=2))
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
