#!/usr/bin/env python
"""Fine-tune (or train) a causal language model with LayerCollapse, collapse its MLP blocks, save, reload, compare.

Defaults: ``gpt2`` on WikiText-2 (``load_dataset("wikitext", "wikitext-2-raw-v1")``, needs the Hub). With
``--offline_demo`` (or ``examples/configs/clm_offline.json``) it runs without the Hub: a small GPT-2 (4 blocks,
d=128) built from its config and trained from scratch on Shakespeare (``offline_assets.load_shakespeare``;
validation = Hamlet, Julius Caesar, The Tempest, Twelfth Night) with the real GPT-2 tokenizer
(``offline_assets.gpt2_tokenizer_dir()``).

The story: evaluate (perplexity, next-token accuracy) → train with ``LayerCollapseTrainer`` → collapse the blocks
whose α reached the threshold → evaluate → ``save_model`` → reload with
``AutoModelForCausalLM.from_pretrained(output_dir)`` → evaluate the reloaded model → print the collapse report and
write ``output_dir/layercollapse_results.json``.

Offline demo::

    python examples/run_clm.py examples/configs/clm_offline.json

Hub defaults (GPT-2, WikiText-2; the paper collapsed block 11, then 10 and 11)::

    python examples/run_clm.py --output_dir out/gpt2-wikitext2 --layers_to_transform -2 -1 \\
        --reg_weight 1.0 --alpha_learning_rate 0.01 --reg_schedule linear --reg_warmup_ratio 0.3 \\
        --collapse_at_end --num_train_epochs 1 --per_device_train_batch_size 8 --learning_rate 5e-5

Several processes (DDP, gloo on CPU) or FSDP::

    accelerate launch --config_file examples/accelerate_configs/multi_cpu_ddp.yaml \\
        examples/run_clm.py examples/configs/clm_offline.json
    accelerate launch --config_file examples/accelerate_configs/fsdp.yaml \\
        examples/run_clm.py examples/configs/clm_offline.json

A JSON file may be followed by flags that override it, e.g. ``... clm_offline.json --max_steps 20``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import offline_assets as assets
import torch
import transformers
from datasets import DatasetDict, load_dataset
from layercollapse_utils import (
    LayerCollapseArguments,
    calibration_data,
    count_parameters,
    parse_arguments,
    parse_config_overrides,
    run_layercollapse,
    use_cpu_for_multi_process_without_gpu,
)
from metrics import load_metric
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    EvalPrediction,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_layercollapse as hlc

logger = logging.getLogger(__name__)

HUB_MODEL = "gpt2"
HUB_DATASET = ("wikitext", "wikitext-2-raw-v1")
OFFLINE_DATASET = "shakespeare"
#: The small GPT-2 of the offline demo (trained from scratch): 4 blocks, d=128, 4 heads, MLP 128→512→128.
OFFLINE_CONFIG_OVERRIDES = "n_layer=4,n_embd=128,n_head=4"


@dataclass
class ModelArguments:
    """Which model: a pretrained one, or one built from a config (``model_type`` + ``config_overrides``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": f"Model id or folder (default {HUB_MODEL}; with --offline_demo a small GPT-2 from config)."},
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Train from scratch a model of this type (e.g. gpt2) built from its config."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": f"Config fields for a model built from scratch, e.g. '{OFFLINE_CONFIG_OVERRIDES}'."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the model's; with --offline_demo the GPT-2 one)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are stored."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})


@dataclass
class DataArguments:
    """Which text, and how to cut it into blocks."""

    offline_demo: bool = field(
        default=False,
        metadata={"help": "Use the embedded assets: Shakespeare, the GPT-2 tokenizer, a small GPT-2 from config."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub dataset (default {HUB_DATASET[0]}), or '{OFFLINE_DATASET}' for the embedded plays."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": f"Dataset configuration (default {HUB_DATASET[1]} for wikitext)."}
    )
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str = field(default="validation", metadata={"help": "Evaluation split."})
    text_column_name: str = field(default="text", metadata={"help": "Text column."})
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training sequence (default: min(1024, the model's maximum))."}
    )
    max_train_texts: int | None = field(
        default=None, metadata={"help": "Keep only the first N raw training texts before tokenizing (quick runs)."}
    )
    max_eval_texts: int | None = field(
        default=None, metadata={"help": "Keep only the first N raw evaluation texts before tokenizing."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation blocks."})
    shakespeare_sample_by: str = field(
        default="paragraph", metadata={"help": "Rows of the embedded plays: 'document', 'paragraph' or 'line'."}
    )


ARGUMENT_TYPES = (ModelArguments, DataArguments, LayerCollapseArguments, hlc.CollapseArguments, TrainingArguments)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse the five argument groups from flags, a JSON file, or a JSON file followed by flags."""
    return parse_arguments(ARGUMENT_TYPES, argv)


def load_raw_data(data_args: DataArguments, model_args: ModelArguments) -> DatasetDict:
    """The raw ``DatasetDict`` (embedded Shakespeare or a Hub dataset)."""
    name = data_args.dataset_name or (OFFLINE_DATASET if data_args.offline_demo else HUB_DATASET[0])
    if name == OFFLINE_DATASET:
        return assets.load_shakespeare(sample_by=data_args.shakespeare_sample_by)
    config = data_args.dataset_config_name or (HUB_DATASET[1] if name == HUB_DATASET[0] else None)
    return load_dataset(name, config, cache_dir=model_args.cache_dir)


def build_model(model_args: ModelArguments, data_args: DataArguments, tokenizer: Any) -> tuple[Any, str]:
    """A pretrained model, or one built from a config (``model_type``, or the offline demo's small GPT-2)."""
    model_type = model_args.model_type
    if model_type is None and data_args.offline_demo and not model_args.model_name_or_path:
        model_type = "gpt2"
    if model_args.model_name_or_path or model_type is None:
        path = model_args.model_name_or_path or HUB_MODEL
        model = AutoModelForCausalLM.from_pretrained(path, cache_dir=model_args.cache_dir,
                                                     revision=model_args.model_revision)
        return model, path
    overrides = model_args.config_overrides
    if overrides is None and data_args.offline_demo:
        overrides = OFFLINE_CONFIG_OVERRIDES
    config = AutoConfig.for_model(model_type, **parse_config_overrides(overrides))
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return AutoModelForCausalLM.from_config(config), f"{model_type} from config ({overrides or 'defaults'})"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the results written to ``output_dir/layercollapse_results.json``."""
    start = time.perf_counter()
    use_cpu_for_multi_process_without_gpu()
    model_args, data_args, injection_args, collapse_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    # ------------------------------------------------------------------ tokenizer and model
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_name is None:
        tokenizer_name = str(assets.gpt2_tokenizer_dir()) if data_args.offline_demo else HUB_MODEL
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, cache_dir=model_args.cache_dir)
    model, model_description = build_model(model_args, data_args, tokenizer)
    params_original = count_parameters(model)

    # ------------------------------------------------------------------ data: tokenize, concatenate, cut in blocks
    raw = load_raw_data(data_args, model_args)
    splits = {"train": raw[data_args.train_split], "eval": raw[data_args.eval_split]}
    limits = {"train": data_args.max_train_texts, "eval": data_args.max_eval_texts}
    for key, limit in limits.items():
        if limit is not None:
            splits[key] = splits[key].select(range(min(limit, len(splits[key]))))
    max_positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    block_size = min(data_args.block_size or 1024, max_positions)
    text_column = data_args.text_column_name
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(list(batch[text_column]), verbose=False)["input_ids"]
        return {"input_ids": [[*seq, eos] if seq and eos is not None else seq for seq in ids]}

    def group_texts(batch: dict[str, list]) -> dict[str, list]:
        tokens = list(chain.from_iterable(batch["input_ids"]))
        total = (len(tokens) // block_size) * block_size
        blocks = [tokens[i : i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    with training_args.main_process_first(desc="tokenizing"):
        for key, split in splits.items():
            split = split.map(tokenize, batched=True, remove_columns=split.column_names)
            splits[key] = split.map(group_texts, batched=True, batch_size=1000)
    if data_args.max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(data_args.max_train_samples, len(splits["train"]))))
    if data_args.max_eval_samples is not None:
        splits["eval"] = splits["eval"].select(range(min(data_args.max_eval_samples, len(splits["eval"]))))

    calibration = calibration_data(splits["train"], default_data_collator, injection_args.calibration_samples,
                                   training_args.per_device_eval_batch_size)
    config = injection_args.to_config(collapse_args)
    model = hlc.get_collapse_model(model, config, calibration_data=calibration)
    accuracy = load_metric("accuracy")

    def preprocess_logits_for_metrics(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
        logits = logits[0] if isinstance(logits, tuple) else logits
        return logits.argmax(dim=-1)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predictions = np.asarray(prediction.predictions)[:, :-1].reshape(-1)
        labels = np.asarray(prediction.label_ids)[:, 1:].reshape(-1)
        keep = labels != -100
        return accuracy.compute(predictions=predictions[keep], references=labels[keep])

    def add_perplexity(metrics: dict[str, float], prefix: str) -> None:
        loss = metrics[f"{prefix}_loss"]
        metrics[f"{prefix}_perplexity"] = math.exp(loss) if loss < 700 else float("inf")

    trainer = hlc.LayerCollapseTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        collapse_args=collapse_args,
        calibration_data=calibration,
    )
    return run_layercollapse(
        trainer,
        AutoModelForCausalLM,
        metric="perplexity",
        task="causal-lm",
        description={
            "model": model_description,
            "dataset": data_args.dataset_name or (OFFLINE_DATASET if data_args.offline_demo else "/".join(HUB_DATASET)),
            "block_size": block_size,
            "train_blocks": len(splits["train"]),
            "eval_blocks": len(splits["eval"]),
            "layercollapse_config": config.to_dict(),
            "calibration_samples": injection_args.calibration_samples,
        },
        metrics_hook=add_perplexity,
        greater_is_better=False,
        start_time=start,
        params_original=params_original,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
