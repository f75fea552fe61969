"""Train a tiny injected BERT classifier with LayerCollapseTrainer and write the α trajectory as JSON.

Used by tests/test_trainer.py to compare single-process and multi-process (DDP / FSDP) runs:

    python tests/scripts/train_tiny.py OUT.json --per_device_batch 8
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/train_tiny.py OUT.json --per_device_batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
from transformers.utils import logging

import hf_layercollapse as hlc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per_device_batch", type=int, default=8)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fsdp", default="")
    parser.add_argument("--gpu", action="store_true", help="train on the GPUs (FSDP under accelerate needs them)")
    parser.add_argument("--progressive_steps", type=int, default=0)
    parser.add_argument("--planned", action="store_true", help="progressive_order='planned' after 1 warm-up step")
    args = parser.parse_args()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = hlc.get_collapse_model(BertForSequenceClassification(config), hlc.LayerCollapseConfig(reg_weight=0.5))
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 60, (8,), generator=generator), "labels": torch.tensor(i % 2)}
            for i in range(64)]
    training = TrainingArguments(
        tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum, optim="sgd", learning_rate=0.3, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
        fsdp=args.fsdp, use_cpu=not args.gpu,
        fsdp_config={"use_orig_params": True, "min_num_params": 0} if args.fsdp else None,
    )
    schedule = {"progressive_start": 1, "progressive_order": "planned"} if args.planned else {}
    calibration = [{"input_ids": torch.stack([d["input_ids"] for d in data[i:i + 8]])} for i in (0, 8)]
    trainer = hlc.LayerCollapseTrainer(model=model, args=training, train_dataset=data,
                                       collapse_args=hlc.CollapseArguments(alpha_learning_rate=0.3,
                                                                           progressive_steps=args.progressive_steps,
                                                                           **schedule),
                                       calibration_data=calibration if args.planned else None)
    trainer.train()
    if trainer.is_world_process_zero():
        logs = [{k: v for k, v in entry.items() if k.startswith("alpha/") or k in ("loss", "reg_loss", "step")}
                for entry in trainer.state.log_history if "loss" in entry]
        with open(args.out, "w") as handle:
            json.dump({"world_size": int(os.environ.get("WORLD_SIZE", 1)), "logs": logs}, handle, indent=1)
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a gloo group left open can abort the process at exit


if __name__ == "__main__":
    main()
    # torch 2.13's gloo backend sometimes aborts during interpreter teardown ("terminate called without an
    # active exception") after everything finished; the results are written, so leave without teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
