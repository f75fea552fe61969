#!/usr/bin/env python
"""Fine-tune (or train) an image classifier with LayerCollapse, collapse its MLP blocks, save, reload, compare.

Defaults: ``google/vit-base-patch16-224-in21k`` on ``beans`` (needs the Hub). With ``--offline_demo`` (or
``examples/configs/image_classification_offline.json``) it runs without the Hub: a small ViT (4 blocks, d=64,
28×28 images in 4×4 patches) built from its config and trained from scratch on Fashion-MNIST
(``offline_assets.load_fashion_mnist``), with a ``ViTImageProcessor`` built here. Images are prepared with
the image processor alone (PIL; torchvision is not needed).

The story: evaluate → train with ``LayerCollapseTrainer`` → collapse the blocks whose α reached the threshold →
evaluate → ``save_model`` → reload with ``AutoModelForImageClassification.from_pretrained(output_dir)`` → evaluate
the reloaded model → print the collapse report and write ``output_dir/layercollapse_results.json``.

Offline demo::

    python examples/run_image_classification.py examples/configs/image_classification_offline.json

Hub defaults (ViT-B/16 on beans, last 4 of 12 blocks)::

    python examples/run_image_classification.py --output_dir out/vit-beans --layers_to_transform -4 -3 -2 -1 \\
        --reg_weight 1.0 --alpha_learning_rate 0.01 --reg_schedule linear --reg_warmup_ratio 0.3 \\
        --collapse_at_end --num_train_epochs 3 --per_device_train_batch_size 16 --learning_rate 5e-5

Several processes (DDP; gloo on CPU)::

    accelerate launch --config_file examples/accelerate_configs/multi_cpu_ddp.yaml \\
        examples/run_image_classification.py examples/configs/image_classification_offline.json

A JSON file may be followed by flags that override it, e.g. ``... image_classification_offline.json --max_steps 20``.
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
import torch
import transformers
from datasets import ClassLabel, DatasetDict, load_dataset
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
    AutoImageProcessor,
    AutoModelForImageClassification,
    EvalPrediction,
    TrainingArguments,
    set_seed,
)

import hf_layercollapse as hlc

try:  # transformers >= 5: the PIL backend of ViTImageProcessor (the default one needs torchvision)
    from transformers import ViTImageProcessorPil as ViTImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import ViTImageProcessor

logger = logging.getLogger(__name__)

HUB_MODEL = "google/vit-base-patch16-224-in21k"
HUB_DATASET = "beans"
OFFLINE_DATASET = "fashion_mnist"
#: The small ViT of the offline demo (trained from scratch): 4 blocks, d=64, MLP 64→256→64, 49 patches of 4×4.
OFFLINE_CONFIG_OVERRIDES = (
    "hidden_size=64,num_hidden_layers=4,num_attention_heads=4,intermediate_size=256,image_size=28,patch_size=4"
)


@dataclass
class ModelArguments:
    """Which model: a pretrained one, or one built from a config (``model_type`` + ``config_overrides``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": f"Model id or folder (default {HUB_MODEL}; with --offline_demo a small ViT from config)."},
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Train from scratch a model of this type (e.g. vit) built from its config."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config fields for a model built from scratch, e.g. 'hidden_size=64,...'."}
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor (default: the model's, or one built for a model from config)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are stored."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    ignore_mismatched_sizes: bool = field(
        default=True, metadata={"help": "Replace a pretrained classification head whose size differs."}
    )


@dataclass
class DataArguments:
    """Which images."""

    offline_demo: bool = field(
        default=False,
        metadata={"help": "Use the embedded assets: Fashion-MNIST and a small ViT from config (no Hub needed)."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub dataset (default {HUB_DATASET}), or '{OFFLINE_DATASET}' for the embedded images."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(default=None, metadata={"help": "Evaluation split (default: validation or test)."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: image or img)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: label or labels)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only N evaluation images."})
    subsample_seed: int = field(default=0, metadata={"help": "Seed of the embedded Fashion-MNIST subsamples."})


ARGUMENT_TYPES = (ModelArguments, DataArguments, LayerCollapseArguments, hlc.CollapseArguments, TrainingArguments)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse the five argument groups from flags, a JSON file, or a JSON file followed by flags."""
    return parse_arguments(ARGUMENT_TYPES, argv)


def load_raw_data(data_args: DataArguments, model_args: ModelArguments) -> DatasetDict:
    """The raw ``DatasetDict`` (embedded Fashion-MNIST, subsampled on loading, or a Hub dataset)."""
    name = data_args.dataset_name or (OFFLINE_DATASET if data_args.offline_demo else HUB_DATASET)
    if name == OFFLINE_DATASET:
        return assets.load_fashion_mnist(
            train_size=data_args.max_train_samples, test_size=data_args.max_eval_samples, seed=data_args.subsample_seed
        )
    return load_dataset(name, data_args.dataset_config_name, cache_dir=model_args.cache_dir)


def _first_present(candidates: Sequence[str], columns: Sequence[str], what: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"No {what} column among {list(columns)}; pass it explicitly.")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the results written to ``output_dir/layercollapse_results.json``."""
    start = time.perf_counter()
    use_cpu_for_multi_process_without_gpu()
    model_args, data_args, injection_args, collapse_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    # The image column is turned into pixel_values on the fly: Trainer must not drop it beforehand.
    training_args.remove_unused_columns = False

    # ------------------------------------------------------------------ data
    raw = load_raw_data(data_args, model_args)
    eval_split = data_args.eval_split or _first_present(("validation", "test"), list(raw), "evaluation split")
    train_data, eval_data = raw[data_args.train_split], raw[eval_split]
    if data_args.max_train_samples is not None and len(train_data) > data_args.max_train_samples:
        train_data = train_data.select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None and len(eval_data) > data_args.max_eval_samples:
        eval_data = eval_data.select(range(data_args.max_eval_samples))
    image_column = data_args.image_column_name or _first_present(("image", "img"), train_data.column_names, "image")
    label_column = data_args.label_column_name or _first_present(("label", "labels"), train_data.column_names, "label")
    label_feature = train_data.features[label_column]
    if isinstance(label_feature, ClassLabel):
        label_names = list(label_feature.names)
    else:
        label_names = [str(v) for v in sorted(set(train_data[label_column]))]
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {name: i for i, name in enumerate(label_names)}}

    # ------------------------------------------------------------------ model and image processor
    model_type = model_args.model_type
    if model_type is None and data_args.offline_demo and not model_args.model_name_or_path:
        model_type = "vit"
    if model_args.model_name_or_path or model_type is None:
        model_path = model_args.model_name_or_path or HUB_MODEL
        model = AutoModelForImageClassification.from_pretrained(
            model_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **labels,
        )
        image_processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_path, cache_dir=model_args.cache_dir
        )
        model_description = model_path
    else:
        overrides = model_args.config_overrides
        if overrides is None and data_args.offline_demo:
            overrides = OFFLINE_CONFIG_OVERRIDES
        model_config = AutoConfig.for_model(model_type, **parse_config_overrides(overrides), **labels)
        model = AutoModelForImageClassification.from_config(model_config)
        if model_args.image_processor_name:
            image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name)
        else:
            size = model_config.image_size
            image_processor = ViTImageProcessor(
                do_resize=True, size={"height": size, "width": size}, do_normalize=True,
                image_mean=[0.5] * 3, image_std=[0.5] * 3,
            )
        model_description = f"{model_type} from config ({overrides or 'defaults'})"
    params_original = count_parameters(model)

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = [image.convert("RGB") for image in batch[image_column]]
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": list(batch[label_column])}

    train_data = train_data.with_transform(transform)
    eval_data = eval_data.with_transform(transform)

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples]),
        }

    calibration = calibration_data(train_data, collate, injection_args.calibration_samples,
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
        processing_class=image_processor,
        data_collator=collate,
        compute_metrics=compute_metrics,
        collapse_args=collapse_args,
        calibration_data=calibration,
    )
    return run_layercollapse(
        trainer,
        AutoModelForImageClassification,
        metric="accuracy",
        task="image-classification",
        description={
            "model": model_description,
            "dataset": data_args.dataset_name or (OFFLINE_DATASET if data_args.offline_demo else HUB_DATASET),
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
