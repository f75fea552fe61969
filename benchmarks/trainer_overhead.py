"""Step time of LayerCollapseTrainer vs the plain transformers.Trainer on the same model and batches.

    python benchmarks/trainer_overhead.py            # all-MiniLM-L6-v2, batch 32, sequence 64, 5 × 8 steps each
    python benchmarks/trainer_overhead.py --quick    # CI smoke run

The two trainers alternate in rounds (plain, ours, plain, ours, ...) so machine load hits both; each round
trains a fresh copy of the same classifier for a fixed number of steps; a callback times every optimizer
step. The first round and the first step of every round are warm-up. The ratio of median step times is the
overhead (aim: ≤ 1.05).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from common import write_results
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

import hf_layercollapse as hlc
from hf_layercollapse import assets


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer), without the trainer's set-up."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.disable_progress_bar()
    rounds, steps, batch, seq = (1, 3, 4, 16) if args.quick else (5, 8, 32, 64)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
    data = [{"input_ids": torch.randint(1000, 20000, (seq,)), "labels": torch.tensor(i % 2)}
            for i in range(steps * batch)]
    times = {"Trainer": [], "LayerCollapseTrainer": []}
    for _ in range(rounds + 1):
        for name in times:
            model = copy.deepcopy(base)
            cls = Trainer
            if name == "LayerCollapseTrainer":
                model, cls = hlc.get_collapse_model(model), hlc.LayerCollapseTrainer
            training = TrainingArguments(tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                                         report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=steps,
                                         use_cpu=True, dataloader_num_workers=0)
            timer = StepTimer()
            cls(model=model, args=training, train_dataset=data, callbacks=[timer]).train()
            times[name].append(timer.durations[1:])  # the first step of a run warms up
    medians = {name: statistics.median([t for run in values[1:] for t in run]) for name, values in times.items()}
    ratio = medians["LayerCollapseTrainer"] / medians["Trainer"]
    rows = [{"trainer": name, "median step (s)": f"{medians[name]:.3f}", "rounds": rounds, "steps/round": steps,
             "batch × seq": f"{batch} × {seq}"} for name in times]
    rows.append({"trainer": "ratio (ours / plain)", "median step (s)": f"{ratio:.3f}"})
    if args.quick:
        print(rows)
        return
    write_results("trainer_overhead", "Training overhead: LayerCollapseTrainer vs Trainer (all-MiniLM-L6-v2, CPU)",
                  rows, ["trainer", "median step (s)", "rounds", "steps/round", "batch × seq"],
                  notes="All 6 MLP blocks injected (blend activation).")


if __name__ == "__main__":
    main()
