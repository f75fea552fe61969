"""Step time of LayerCollapseTrainer vs the plain transformers.Trainer on the same model and batches.

    python benchmarks/trainer_overhead.py            # all-MiniLM-L6-v2, batch 32, sequence 64, 5 × 8 steps each
    python benchmarks/trainer_overhead.py --quick    # CI smoke run
    python benchmarks/trainer_overhead.py --device cuda --dtype bfloat16   # results/trainer_overhead_cuda_bfloat16.*

Three runs alternate in rounds so machine load hits all of them: the plain ``Trainer`` on the original model, the
plain ``Trainer`` on the same model with every MLP block injected (blend activation, α = 0), and
``LayerCollapseTrainer`` on the injected model. Each run trains a fresh copy of the same classifier for a fixed
number of steps; a callback times every optimizer step. The first round and the first step of every run are
warm-up. Two ratios of median step times: the trainer's own overhead (ours / plain ``Trainer``, both on the
injected model; aim ≤ 1.05) and the end-to-end cost of fine-tuning with LayerCollapse (ours / plain ``Trainer`` on
the original model: adds the blended activations' compute). On CUDA the step times are wall seconds after
``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch
from common import Placement, add_device_arguments, assets, configure, write_results
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

import hf_layercollapse as hlc


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer), without the trainer's set-up."""

    def __init__(self, placement: Placement) -> None:
        self.durations: list[float] = []
        self.clock = placement.clock  # on CUDA after synchronising: the step's work, not its launch

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(self.clock() - self.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    add_device_arguments(parser)
    args = parser.parse_args()
    placement = configure(parser, args)
    print(f"device: {placement.label()}", flush=True)
    logging.disable_progress_bar()
    rounds, steps, batch, seq = (1, 3, 4, 16) if args.quick else (5, 8, 32, 64)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
    data = [{"input_ids": torch.randint(1000, 20000, (seq,)), "labels": torch.tensor(i % 2)}
            for i in range(steps * batch)]
    times = {"Trainer, original model": [], "Trainer, injected model": [], "LayerCollapseTrainer, injected model": []}
    for _ in range(rounds + 1):
        for name in times:
            model = copy.deepcopy(base)
            cls = hlc.LayerCollapseTrainer if name.startswith("LayerCollapse") else Trainer
            if name.endswith("injected model"):
                model = hlc.get_collapse_model(model)
            training = TrainingArguments(tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                                         report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=steps,
                                         dataloader_num_workers=0, **placement.training_kwargs())
            timer = StepTimer(placement)
            cls(model=model, args=training, train_dataset=data, callbacks=[timer]).train()
            times[name].append(timer.durations[1:])  # the first step of a run warms up
    medians = {name: statistics.median([t for run in values[1:] for t in run]) for name, values in times.items()}
    ours = medians["LayerCollapseTrainer, injected model"]
    digits = 3 if placement.device.type == "cpu" else 4  # GPU steps take milliseconds
    rows = [{"trainer": name, "median step (s)": f"{medians[name]:.{digits}f}", "rounds": rounds, "steps/round": steps,
             "batch × seq": f"{batch} × {seq}"} for name in times]
    rows.append({"trainer": "ratio: trainer overhead (ours / Trainer, both injected; aim ≤ 1.05)",
                 "median step (s)": f"{ours / medians['Trainer, injected model']:.3f}"})
    rows.append({"trainer": "ratio: end to end (ours / Trainer on the original model)",
                 "median step (s)": f"{ours / medians['Trainer, original model']:.3f}"})
    if args.quick:
        print(rows)
        return
    cpu = (placement.device.type, placement.dtype_name) == ("cpu", "float32")
    write_results("trainer_overhead" if cpu else f"trainer_overhead_{placement.device.type}_{placement.dtype_name}",
                  f"Training overhead: LayerCollapseTrainer vs Trainer (all-MiniLM-L6-v2, {placement.label()})",
                  rows, ["trainer", "median step (s)", "rounds", "steps/round", "batch × seq"],
                  notes="Injected: all 6 MLP blocks (blend activation). The end-to-end ratio includes the blended "
                        "activations' own compute, which any LayerCollapse fine-tuning pays.")


if __name__ == "__main__":
    main()
