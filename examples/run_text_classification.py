#!/usr/bin/env python
"""Fine-tune a text classifier with LayerCollapse, collapse its MLP blocks, save, reload and compare.

Defaults: ``bert-base-uncased`` on GLUE SST-2 (``load_dataset("glue", "sst2")``, needs the Hub). With
``--offline_demo`` (or ``examples/configs/text_classification_offline.json``) it runs without the Hub on the
embedded assets: all-MiniLM-L6-v2 (``offline_assets.minilm_path()``) on the binary tweet sentiment
corpus (``offline_assets.load_tweets``), evaluated on a fixed 1,000-tweet test split.

The story: evaluate → fine-tune with ``LayerCollapseTrainer`` (α of the chosen blocks pulled towards 1) →
collapse the blocks whose α reached the threshold → evaluate → ``save_model`` → reload with
``AutoModelForSequenceClassification.from_pretrained(output_dir)`` → evaluate the reloaded model → print the
collapse report and write ``output_dir/layercollapse_results.json``.

Offline demo (one process, about 6 minutes on 2 CPU cores)::

    python examples/run_text_classification.py examples/configs/text_classification_offline.json

Hub defaults (BERT-base, SST-2, the paper's last 4 of 12 blocks)::

    python examples/run_text_classification.py --output_dir out/bert-sst2 --layers_to_transform -4 -3 -2 -1 \\
        --reg_weight 1.0 --alpha_learning_rate 0.01 --reg_schedule linear --reg_warmup_ratio 0.3 \\
        --collapse_at_end --num_train_epochs 1 --per_device_train_batch_size 32 --learning_rate 2e-5

Several processes with ``accelerate launch`` (DDP; on CPU the processes use gloo)::

    accelerate launch --config_file examples/accelerate_configs/multi_cpu_ddp.yaml \\
        examples/run_text_classification.py examples/configs/text_classification_offline.json
    # or without a config file:
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        examples/run_text_classification.py examples/configs/text_classification_offline.json

A JSON file may be followed by flags that override it, e.g. ``... offline.json --max_steps 20``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import offline_assets as assets
import transformers
from datasets import ClassLabel, DatasetDict, load_dataset
from layercollapse_utils import (
    LayerCollapseArguments,
    calibration_data,
    count_parameters,
    parse_arguments,
    run_layercollapse,
    use_cpu_for_multi_process_without_gpu,
)
from metrics import load_metric
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    TrainingArguments,
    set_seed,
)

import hf_layercollapse as hlc

logger = logging.getLogger(__name__)

HUB_MODEL = "bert-base-uncased"
HUB_DATASET = ("glue", "sst2")
OFFLINE_DATASET = "tweets"


@dataclass
class ModelArguments:
    """Which model and tokenizer to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": f"Model id or folder. Default: {HUB_MODEL}, or all-MiniLM-L6-v2 with --offline_demo."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are stored."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})


@dataclass
class DataArguments:
    """Which data, and how to prepare it."""

    offline_demo: bool = field(
        default=False,
        metadata={"help": "Use the embedded assets: all-MiniLM-L6-v2 and the binary tweets (no Hub needed)."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub dataset (default {HUB_DATASET[0]}), or '{OFFLINE_DATASET}' for the embedded tweets."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": f"Dataset configuration (default {HUB_DATASET[1]} for glue)."}
    )
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(default=None, metadata={"help": "Evaluation split (default: validation or test)."})
    text_column_name: str | None = field(
        default=None, metadata={"help": "Text column (default: 'sentence' or 'text', whichever exists)."}
    )
    text_pair_column_name: str | None = field(default=None, metadata={"help": "Second text column, for pairs."})
    label_column_name: str = field(default="label", metadata={"help": "Label column."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every input to max_seq_length (default: pad each batch dynamically)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation rows."})
    tweets_test_size: int = field(
        default=1000, metadata={"help": "Size of the fixed, stratified test split of the embedded tweets."}
    )
    tweets_split_seed: int = field(default=0, metadata={"help": "Seed of the embedded tweets' train/test split."})


ARGUMENT_TYPES = (ModelArguments, DataArguments, LayerCollapseArguments, hlc.CollapseArguments, TrainingArguments)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse the five argument groups from flags, a JSON file, or a JSON file followed by flags."""
    return parse_arguments(ARGUMENT_TYPES, argv)


def load_raw_data(data_args: DataArguments, model_args: ModelArguments) -> DatasetDict:
    """The raw ``DatasetDict`` (embedded tweets or a Hub dataset)."""
    name = data_args.dataset_name or (OFFLINE_DATASET if data_args.offline_demo else HUB_DATASET[0])
    if name == OFFLINE_DATASET:
        return assets.load_tweets(binary=True, seed=data_args.tweets_split_seed, test_size=data_args.tweets_test_size)
    config = data_args.dataset_config_name or (HUB_DATASET[1] if name == HUB_DATASET[0] else None)
    return load_dataset(name, config, cache_dir=model_args.cache_dir)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the results written to ``output_dir/layercollapse_results.json``."""
    start = time.perf_counter()
    use_cpu_for_multi_process_without_gpu()
    model_args, data_args, injection_args, collapse_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    # ------------------------------------------------------------------ data
    raw = load_raw_data(data_args, model_args)
    eval_split = data_args.eval_split or next(s for s in ("validation", "test") if s in raw)
    train_data, eval_data = raw[data_args.train_split], raw[eval_split]
    if data_args.max_train_samples is not None:
        train_data = train_data.select(range(min(data_args.max_train_samples, len(train_data))))
    if data_args.max_eval_samples is not None:
        eval_data = eval_data.select(range(min(data_args.max_eval_samples, len(eval_data))))
    text_column = data_args.text_column_name or next(
        c for c in ("sentence", "text", "sentence1") if c in train_data.column_names
    )
    label_feature = train_data.features[data_args.label_column_name]
    if isinstance(label_feature, ClassLabel):
        label_names = list(label_feature.names)
    else:
        label_names = [str(v) for v in sorted(set(train_data[data_args.label_column_name]))]

    # ------------------------------------------------------------------ model
    model_path = model_args.model_name_or_path or (str(assets.minilm_path()) if data_args.offline_demo else HUB_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
    )
    params_original = count_parameters(model)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = (list(batch[text_column]),)
        if data_args.text_pair_column_name:
            texts += (list(batch[data_args.text_pair_column_name]),)
        encoded = tokenizer(
            *texts,
            truncation=True,
            max_length=data_args.max_seq_length,
            padding="max_length" if data_args.pad_to_max_length else False,
        )
        encoded["labels"] = list(batch[data_args.label_column_name])
        return encoded

    with training_args.main_process_first(desc="tokenizing"):
        train_data = train_data.map(tokenize, batched=True, remove_columns=train_data.column_names)
        eval_data = eval_data.map(tokenize, batched=True, remove_columns=eval_data.column_names)

    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=None)
    calibration = calibration_data(train_data, collator, injection_args.calibration_samples,
                                   training_args.per_device_eval_batch_size)
    config = injection_args.to_config(collapse_args)
    model = hlc.get_collapse_model(model, config, calibration_data=calibration)
    accuracy = load_metric("accuracy")

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    trainer = hlc.LayerCollapseTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
        collapse_args=collapse_args,
        calibration_data=calibration,
    )
    return run_layercollapse(
        trainer,
        AutoModelForSequenceClassification,
        metric="accuracy",
        task="text-classification",
        description={
            "model": model_path,
            "dataset": data_args.dataset_name or (OFFLINE_DATASET if data_args.offline_demo else "/".join(HUB_DATASET)),
            "train_rows": len(train_data),
            "eval_rows": len(eval_data),
            "layercollapse_config": config.to_dict(),
            "calibration_samples": injection_args.calibration_samples,
        },
        start_time=start,
        params_original=params_original,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
