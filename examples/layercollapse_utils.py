"""Pieces shared by the LayerCollapse example scripts.

* :class:`LayerCollapseArguments`: the injection options (which blocks, which activation, initial α), parsed by
  ``HfArgumentParser`` next to ``hf_layercollapse.CollapseArguments`` and ``TrainingArguments`` and turned into
  a :class:`hf_layercollapse.LayerCollapseConfig`.
* :func:`parse_arguments`: command line flags, one JSON file (``HfArgumentParser.parse_json_file``, like the
  official Hugging Face examples), or a JSON file followed by flags that override it.
* :func:`run_layercollapse`: the whole story once a script has built its ``LayerCollapseTrainer``: evaluate,
  fine-tune, collapse, save, reload with ``AutoModelFor....from_pretrained``, evaluate again, print the collapse
  report and write ``layercollapse_results.json`` in ``output_dir``.

The scripts import this file as a sibling module (``python examples/run_....py`` puts ``examples/`` on
``sys.path``); copy it along when you copy a script.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, PreTrainedModel, Trainer

import hf_layercollapse as hlc

logger = logging.getLogger(__name__)

RESULTS_NAME = "layercollapse_results.json"

#: ``(metrics, prefix) -> None``: adds derived metrics (e.g. perplexity) to an evaluation's metrics in place.
MetricsHook = Callable[[dict[str, float], str], None]


@dataclass
class LayerCollapseArguments:
    """Which MLP blocks become collapsible and how (the injection half of ``hlc.LayerCollapseConfig``).

    λ (``reg_weight``) and τ (``threshold``) are read from ``hlc.CollapseArguments``, so each option has exactly
    one flag on the command line.
    """

    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Names (or name suffixes) of the MLP blocks to make collapsible. Default: every block."},
    )
    exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "Names (or name suffixes) of MLP blocks to leave alone."}
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={"help": "Indices of the MLP blocks to transform; negative counts from the end (-3 -2 -1: last 3)."},
    )
    activation: str = field(
        default="blend",
        metadata={"help": "'blend' (α·x + (1−α)·act(x): exact at α=0) or 'prelu' (the paper's PReLU)."},
    )
    init_alpha: float | None = field(
        default=None, metadata={"help": "Initial α (default 0.0 for blend, 0.01 for prelu)."}
    )
    linear_target: str = field(
        default="default",
        metadata={"help": "What the blend goes towards: 'default' (the identity; gated blocks: the mean gate), "
                          "'fitted' (each channel's least-squares line; gated blocks: the fitted gate) or 'affine' "
                          "(each block's least-squares affine map, learnable; not with LoRA), fitted on the "
                          "calibration samples and again when each block starts to collapse."},
    )
    calibration_samples: int = field(
        default=256,
        metadata={"help": "Training examples used as calibration data: gated blocks' gate constants, fitted targets, "
                          "and their refit during training. 0: none (then linear_target must be 'default')."},
    )

    def to_config(self, collapse_args: hlc.CollapseArguments) -> hlc.LayerCollapseConfig:
        """The ``LayerCollapseConfig`` these options describe, with λ and τ taken from ``collapse_args``."""
        kwargs: dict[str, Any] = {
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "layers_to_transform": self.layers_to_transform,
            "activation": self.activation,
            "init_alpha": self.init_alpha,
            "linear_target": self.linear_target,
        }
        if collapse_args.reg_weight is not None:
            kwargs["reg_weight"] = collapse_args.reg_weight
        if collapse_args.threshold is not None:
            kwargs["threshold"] = collapse_args.threshold
        return hlc.LayerCollapseConfig(**kwargs)


def parse_arguments(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse ``argv`` (default ``sys.argv[1:]``) into instances of ``dataclass_types``.

    * ``script.py args.json``: ``HfArgumentParser.parse_json_file`` (every key must be a known option);
    * ``script.py args.json --max_steps 2 ...``: the JSON file gives the defaults, the flags override them;
    * ``script.py --flag value ...``: plain command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    if argv and argv[0].endswith(".json"):
        defaults = json.loads(Path(argv[0]).read_text())
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            parser.error(f"{argv[0]} has unknown options {unknown}")
        parser.set_defaults(**defaults)
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def use_cpu_for_multi_process_without_gpu() -> None:
    """Make ``TrainingArguments`` pick the gloo (MULTI_CPU) backend when launched on several processes without a GPU.

    ``accelerate launch --multi_gpu --num_processes 2`` (or ``torchrun``) starts the processes, but without
    ``use_cpu`` transformers' ``TrainingArguments`` does not join them (every rank trains alone, with the warning
    "torch.distributed process group is initialized, but parallel_mode != ParallelMode.DISTRIBUTED"). Call this
    before the arguments are parsed; it does nothing on one process or when CUDA is available.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """``"n_layer=4,n_embd=128"`` → ``{"n_layer": 4, "n_embd": 128}`` (values parsed as JSON when they can be)."""
    result: dict[str, Any] = {}
    for item in (overrides or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config_overrides entry {item!r} is not of the form key=value")
        try:
            result[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            result[key.strip()] = value.strip()
    return result


def calibration_data(dataset, collator: Callable, samples: int, batch_size: int = 32) -> DataLoader | None:
    """The first ``samples`` rows of the (tokenized / transformed) training set in collated batches: calibration
    data for ``hlc.get_collapse_model`` and ``hlc.LayerCollapseTrainer`` (None when ``samples`` is 0). Every
    process gets the same batches, so under DDP every process fits the same targets."""
    if samples <= 0:
        return None
    return DataLoader(dataset.select(range(min(samples, len(dataset)))), batch_size=batch_size, collate_fn=collator)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of (distinct) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def evaluate_model(
    model: PreTrainedModel, trainer: Trainer, prefix: str, metrics_hook: MetricsHook | None = None
) -> dict[str, float]:
    """Evaluate ``model`` on ``trainer``'s eval set with a plain ``Trainer`` sharing ``trainer``'s settings.

    A plain ``Trainer`` is used on purpose: ``LayerCollapseTrainer`` adds λ·Σ(1−α)² to the evaluation loss too
    (which would distort a perplexity) and cannot evaluate a model whose injected blocks were all collapsed.
    """
    evaluator = Trainer(
        model=model,
        args=trainer.args,
        data_collator=trainer.data_collator,
        eval_dataset=trainer.eval_dataset,
        processing_class=trainer.processing_class,
        compute_metrics=trainer.compute_metrics,
        preprocess_logits_for_metrics=trainer.preprocess_logits_for_metrics,
    )
    metrics = evaluator.evaluate(metric_key_prefix=prefix)
    if metrics_hook is not None:
        metrics_hook(metrics, prefix)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _alpha_history(trainer: Trainer) -> list[dict[str, float]]:
    keep = ("step", "loss", "reg_weight", "alpha_mean", "alpha_within_threshold")
    history = []
    for entry in trainer.state.log_history:
        if "alpha_mean" in entry:
            row = {k: entry[k] for k in keep if k in entry}
            row.update({k: v for k, v in entry.items() if k.startswith("alpha/")})
            history.append(row)
    return history


def run_layercollapse(
    trainer: hlc.LayerCollapseTrainer,
    auto_class: type,
    *,
    metric: str,
    task: str,
    description: dict[str, Any] | None = None,
    metrics_hook: MetricsHook | None = None,
    greater_is_better: bool = True,
    start_time: float | None = None,
    params_original: int | None = None,
) -> dict[str, Any]:
    """Evaluate, fine-tune with LayerCollapse, collapse, save, reload, evaluate again and write the results.

    Args:
        trainer: A ready ``LayerCollapseTrainer`` (injected model, datasets, ``compute_metrics``).
        auto_class: The ``AutoModelFor...`` class that reloads the saved checkpoint.
        metric: The main metric's name without prefix (``"accuracy"``, ``"perplexity"``).
        task: A short task name for the results file.
        description: Extra facts (model, dataset, sizes) copied into the results file.
        metrics_hook: Adds derived metrics (``(metrics, prefix) -> None``) after each evaluation.
        greater_is_better: Direction of ``metric`` (for the printed summary only).
        start_time: ``time.perf_counter()`` at the start of the script, for the reported wall time.
        params_original: Parameters of the model before injection (default: counted now, α included).

    Returns:
        The results also written to ``output_dir/layercollapse_results.json``.

    Raises:
        RuntimeError: The reloaded checkpoint does not reproduce the collapsed model's metric.
    """
    start = time.perf_counter() if start_time is None else start_time
    args = trainer.args
    output_dir = Path(args.output_dir)
    unwrap = trainer.accelerator.unwrap_model

    if params_original is None:
        params_original = count_parameters(unwrap(trainer.model))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        logger.warning("FSDP was requested but accelerate did not enable it (accelerate enables FSDP on GPUs only; "
                       "on CPU the processes run plain DDP).")
    if trainer.is_fsdp_enabled:
        # A plain Trainer would shard the model in place before LayerCollapseTrainer does: evaluate with the
        # trainer itself, and take out the regulariser λ·Σ(1−α)² that it adds to the loss.
        reg = trainer.current_reg_weight() * float(hlc.regularization_loss(unwrap(trainer.model)))
        before = trainer.evaluate(metric_key_prefix="before")
        before["before_loss"] -= reg
        if metrics_hook is not None:
            metrics_hook(before, "before")
    else:
        before = evaluate_model(trainer.model, trainer, "before", metrics_hook)

    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    report = trainer.collapse_report
    if trainer.is_fsdp_enabled:
        # Under FSDP the trainer saves the injected (uncollapsed) model: collapse the full checkpoint here.
        trainer.accelerator.wait_for_everyone()
        model = auto_class.from_pretrained(output_dir)
        report = hlc.collapse_model(model, threshold=trainer.collapse_args.threshold)
        if args.should_save:
            model.save_pretrained(output_dir)
    else:
        if report is None:  # collapse_at_end was off: collapse explicitly
            report = trainer.collapse_and_save()
        model = unwrap(trainer.model)
    after = evaluate_model(model, trainer, "collapsed", metrics_hook)

    trainer.accelerator.wait_for_everyone()  # only the main process writes the checkpoint
    reloaded_model = auto_class.from_pretrained(output_dir)
    reloaded = evaluate_model(reloaded_model, trainer, "reloaded", metrics_hook)

    value_after, value_reloaded = after[f"collapsed_{metric}"], reloaded[f"reloaded_{metric}"]
    reload_matches = math.isclose(value_after, value_reloaded, rel_tol=1e-4, abs_tol=1e-6)
    summary = report.to_dict()
    results: dict[str, Any] = {
        "task": task,
        **(description or {}),
        "metric": metric,
        "before": before[f"before_{metric}"],
        "after_collapse": value_after,
        "after_reload": value_reloaded,
        "reload_matches": reload_matches,
        "num_collapsed": summary["num_collapsed"],
        "collapsed_blocks": [b.name for b in report.collapsed],
        "params_original": params_original,
        "params_after": summary["model_params_after"],
        "params_saved": params_original - summary["model_params_after"],
        "params_saved_fraction": (params_original - summary["model_params_after"]) / params_original,
        "params_reloaded": count_parameters(reloaded_model),
        "train_steps": trainer.state.global_step,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "world_size": args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp": bool(trainer.is_fsdp_enabled),
        "eval_before": before,
        "eval_collapsed": after,
        "eval_reloaded": reloaded,
        "collapse_report": summary,
        "alpha_history": _alpha_history(trainer),
        "output_dir": str(output_dir),
    }
    results["wall_time_s"] = time.perf_counter() - start
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
        _print_summary(results, report, greater_is_better)
    if not reload_matches:
        raise RuntimeError(
            f"The checkpoint reloaded from {output_dir} gives {metric}={value_reloaded}, but the collapsed model "
            f"in memory gave {value_after}."
        )
    return results


def _print_summary(results: dict[str, Any], report: hlc.CollapseReport, greater_is_better: bool) -> None:
    metric = results["metric"]
    delta = results["after_reload"] - results["before"]
    if delta == 0:
        change = "the same as before"
    else:
        change = f"{abs(delta):.4f} {'better' if (delta > 0) == greater_is_better else 'worse'} than before"
    rows = [
        (f"{metric} before training", f"{results['before']:.4f}"),
        (f"{metric} after collapse", f"{results['after_collapse']:.4f}"),
        (
            f"{metric} after reload",
            f"{results['after_reload']:.4f} (from_pretrained; "
            f"{'matches' if results['reload_matches'] else 'DOES NOT MATCH'} the collapsed model; "
            f"{change})",
        ),
        (
            "parameters",
            f"{results['params_original']:,} -> {results['params_after']:,} (saved {results['params_saved']:,}, "
            f"{100 * results['params_saved_fraction']:.1f}%; the reloaded model has {results['params_reloaded']:,})",
        ),
        ("collapsed blocks", f"{results['num_collapsed']} {results['collapsed_blocks']}"),
        ("saved to", f"{results['output_dir']} (results in {RESULTS_NAME})"),
        (
            "time",
            f"training {results['train_runtime_s']:.1f} s, whole run {results['wall_time_s']:.1f} s (after imports)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["", "=" * 30 + " LayerCollapse " + "=" * 30, str(report), ""]
    lines += [f"{name.ljust(width)} : {value}" for name, value in rows]
    if not results["num_collapsed"]:
        lines.append(f"NOTE: no block reached |1-α| <= τ={report.threshold}: the model was saved uncollapsed "
                     "(train longer, or raise reg_weight / alpha_learning_rate).")
    lines.append("=" * 75)
    print("\n".join(lines), flush=True)
