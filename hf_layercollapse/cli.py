"""The ``hf-layercollapse`` command: inspect, collapse, write a model card, push to the Hub.

Examples::

    hf-layercollapse inspect bert-base-uncased
    hf-layercollapse inspect runs/injected --json
    hf-layercollapse collapse runs/injected runs/collapsed --threshold 0.05
    hf-layercollapse card runs/collapsed
    hf-layercollapse export runs/collapsed --onnx runs/collapsed.onnx
    HF_TOKEN=hf_... hf-layercollapse push runs/collapsed me/bert-collapsed --private

Each subcommand is a ``(configure, run)`` pair in :data:`COMMANDS`; add one there to extend the tool.
Errors print one line on stderr and exit with status 1 (2 for usage errors); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

PROG = "hf-layercollapse"
PROCESSOR_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "preprocessor_config.json", "processor_config.json")


class CLIError(Exception):
    """A user error reported as one line, without a traceback."""


def _checkpoint_dir(path: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise CLIError(f"{path}: no such directory")
    if not (directory / "config.json").is_file():
        raise CLIError(f"{path}: not a checkpoint directory (no config.json)")
    return directory


def _load_config(directory: Path, require_record: bool = True):
    from transformers import AutoConfig

    from .record import RECORD_KEY

    config = AutoConfig.from_pretrained(directory)
    if require_record and not getattr(config, RECORD_KEY, None):
        raise CLIError(f"{directory}: not a LayerCollapse checkpoint (its config.json has no '{RECORD_KEY}' record; "
                       "inject the model with get_collapse_model and save it first)")
    return config


def _load_model(directory: Path, config, progress: tqdm | None = None):
    """The model of ``directory`` with the Auto class matching ``config.architectures`` (keeps task heads)."""
    from .card import auto_class_for

    auto = auto_class_for(config)
    if progress is not None:
        progress.set_postfix_str(f"loading with {auto.__name__}")
    return auto.from_pretrained(directory)


def _load_processor(directory: Path) -> Any:
    """The tokenizer/processor saved in ``directory``, or ``None`` when there is none."""
    if not any((directory / name).is_file() for name in PROCESSOR_FILES):
        return None
    from transformers import AutoProcessor, AutoTokenizer

    problem: Exception | None = None
    for loader in (AutoProcessor, AutoTokenizer):
        try:
            return loader.from_pretrained(directory)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as err:
            problem = err
    logging.getLogger(__name__).warning("Could not load the tokenizer/processor of %s (%s); it is not copied.",
                                        directory, problem)
    return None


def _read_json(path: str | None) -> Any:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise CLIError(f"{path}: invalid JSON ({err})") from None


def _saved_report(directory: Path, model) -> Any:
    """The report saved by ``collapse`` next to the checkpoint when it still matches the record, else ``None``."""
    from .card import REPORT_FILE, load_collapse_report, report_covers_plan

    path = directory / REPORT_FILE
    if not path.is_file():
        return None
    report = load_collapse_report(path)
    if report_covers_plan(report, model):
        return report
    logging.getLogger(__name__).warning("%s does not match the checkpoint's record; rebuilding the report.", path)
    return None


def _card_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"base_model": args.base_model, "license": args.license, "datasets": args.dataset, "tags": args.tag,
               "model_name": args.model_name, "template_path": args.template,
               "eval_results": _read_json(args.eval_results), "training_info": _read_json(args.training_info)}
    if args.template is not None and not Path(args.template).is_file():
        raise CLIError(f"{args.template}: no such template file")
    return {k: v for k, v in options.items() if v is not None}


# ---------------------------------------------------------------------------------------------------- inspect


def configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="PATH_OR_REPO", help="a checkpoint directory or a Hub repo id")
    parser.add_argument("--threshold", type=float, default=None,
                        help="τ for 'ready to collapse' (default: the recorded threshold, else 0.05)")
    parser.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    parser.add_argument("--token", default=None, help="Hub token for private repos (default: HF_TOKEN)")
    parser.add_argument("--memory", metavar="LINEAR_TARGET", nargs="?", const="default", default=None,
                        choices=["default", "fitted", "affine"],
                        help="also estimate the memory injecting every MLP block towards this linear target and "
                             "training it with AdamW adds (estimate_memory; default target: 'default')")
    parser.add_argument("--affine_rank", type=int, default=None, metavar="R",
                        help="with --memory affine: a rank-R trainable correction of the frozen fitted map instead of "
                             "the full matrix")


def _inspect_rows(model, threshold: float) -> list[dict[str, Any]]:
    from .activation import injected_activations
    from .collapse import unit_costs
    from .record import CollapseRecord
    from .units import find_mlp_blocks

    injected = injected_activations(model)
    rows = []
    for unit in find_mlp_blocks(model):
        owner = unit.owner(model)
        alpha = injected[unit.name].alpha_value if unit.name in injected else None
        row = {"name": unit.name, "kind": unit.kind.value, "state": "injected" if alpha is not None else "plain",
               "alpha": alpha, "shape": list(unit.layout.dims(owner)), "params_before": None, "params_after": None,
               "ready": alpha is not None and abs(1 - alpha) <= threshold}
        before, after, _, _ = unit_costs(owner, unit.layout, injected.get(unit.name))
        if after < before:
            row["params_before"], row["params_after"] = before, after
        rows.append(row)
    record = CollapseRecord.of(model)
    for name, entry in (record.collapsed() if record is not None else {}).items():
        rows.append({"name": name, "kind": entry.layout.kind.value, "state": "collapsed", "alpha": entry.alpha,
                     "shape": [entry.in_features, entry.out_features], "params_before": None, "params_after": None,
                     "ready": False})
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(rows, key=lambda r: order.get(r["name"], -1))


def run_inspect(args: argparse.Namespace) -> int:
    from transformers import AutoModel

    from .collapse import model_params
    from .record import CollapseRecord, hub_model_id

    target = Path(args.target)
    if target.exists():
        _checkpoint_dir(args.target)
        model = AutoModel.from_pretrained(target)
    elif hub_model_id(args.target) is None:  # Hub ids: "namespace/name", or a bare name ("gpt2")
        raise CLIError(f"{args.target}: no such directory (and not a Hub repo id)")
    else:
        try:
            model = AutoModel.from_pretrained(args.target, token=args.token or os.environ.get("HF_TOKEN"))
        except OSError as err:
            raise CLIError(f"{args.target}: no such directory, and not loadable as a Hub repo id: "
                           f"{_one_line(err)}") from err
    record = CollapseRecord.of(model)
    recorded = record.threshold if record is not None else None
    threshold = args.threshold if args.threshold is not None else (recorded if recorded is not None else 0.05)
    rows = _inspect_rows(model, threshold)
    total = model_params(model)  # the architecture's own parameters: α and the injected targets are not counted

    def saving(selected: list[dict[str, Any]]) -> dict[str, Any]:
        saved = sum(r["params_before"] - r["params_after"] for r in selected)
        return {"blocks": [r["name"] for r in selected], "params_saved": saved,
                "fraction": saved / total if total else 0.0}

    collapsible = [r for r in rows if r["params_before"] is not None]
    result = {"model": type(model).__name__,
              "model_type": record.base_model_type if record is not None else model.config.model_type,
              "parameters": total, "threshold": threshold, "blocks": rows,
              "savings": {"ready": saving([r for r in collapsible if r["ready"]]), "all": saving(collapsible)}}
    estimate = None
    if args.memory is not None:
        from .config import CollapseConfig
        from .memory import estimate_memory

        estimate = estimate_memory(model, CollapseConfig(linear_target=args.memory, affine_rank=args.affine_rank))
        result["memory"] = {"linear_target": args.memory, "affine_rank": args.affine_rank, **estimate.to_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']} ({result['model_type']}), {total:,} parameters, τ = {threshold}")
    table = [("block", "kind", "state", "alpha", "shape", "params if collapsed")]
    for r in rows:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:.4f}"
        shape = "→".join(str(x) for x in r["shape"])
        params = "-" if r["params_before"] is None else f"{r['params_before']:,} → {r['params_after']:,}"
        table.append((r["name"], r["kind"], r["state"] + (" (ready)" if r["ready"] else ""), alpha, shape, params))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    lines = [("ready", "collapsing the {n} injected blocks with |1-α| ≤ τ now")] if any(
        r["state"] == "injected" for r in rows) else []
    lines.append(("all", "collapsing all {n} mergeable blocks (after training them to α = 1)"))
    for key, what in lines:
        saving_ = result["savings"][key]
        print(f"{what.format(n=len(saving_['blocks']))} would save {saving_['params_saved']:,} parameters "
              f"({100 * saving_['fraction']:.2f}%)")
    if estimate is not None:
        rank = f", affine_rank={args.affine_rank}" if args.affine_rank is not None else ""
        print(f"\nMemory added by LayerCollapse (linear_target={args.memory!r}{rank}, AdamW):\n{estimate}")
    return 0


# --------------------------------------------------------------------------------------------------- collapse


def configure_collapse(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN_DIR", help="a saved injected (and fine-tuned) model")
    parser.add_argument("output", metavar="OUT_DIR", help="where to write the collapsed checkpoint")
    parser.add_argument("--threshold", type=float, default=None,
                        help="τ: merge blocks with |1-α| ≤ τ (default: the threshold of the model's config)")
    parser.add_argument("--blocks", nargs="+", default=None, metavar="BLOCK",
                        help="collapse only these blocks (names or suffixes such as layer.11)")
    parser.add_argument("--force", action="store_true",
                        help="merge the named --blocks even when α is far from 1 (drops their non-linear part)")
    parser.add_argument("--plan", default=None, metavar="PLAN_DIR",
                        help="apply a plan written by 'plan' instead (no fine-tuning or α needed)")


def run_collapse(args: argparse.Namespace) -> int:
    from .card import REPORT_FILE
    from .collapse import collapse_model
    from .record import CollapseRecord

    source = _checkpoint_dir(args.input)
    target = Path(args.output)
    if target.resolve() == source.resolve():
        raise CLIError("OUT_DIR must differ from IN_DIR (the input's weights are still being read)")
    if args.plan:
        from .planner import CollapsePlan

        if args.blocks or args.threshold is not None or args.force:
            raise CLIError("--plan takes its blocks from the plan: leave out --blocks, --threshold and --force")
        options: dict[str, Any] = {"plan": CollapsePlan.load(args.plan)}
        config = _load_config(source, require_record=False)
    else:
        if args.force and not args.blocks:
            raise CLIError("--force needs --blocks: name the blocks to merge regardless of α")
        options = {"blocks": args.blocks, "threshold": args.threshold, "force": args.force}
        config = _load_config(source)
        if not CollapseRecord.of(config).injected():
            raise CLIError(f"{args.input}: every block of this checkpoint is already collapsed; nothing to do")
    with tqdm(total=3, desc="collapse", unit="step", file=sys.stderr) as progress:
        model = _load_model(source, config, progress)
        processor = _load_processor(source)
        progress.update()
        progress.set_postfix_str("merging")
        report = collapse_model(model, **options)
        progress.update()
        progress.set_postfix_str(f"saving to {target}")
        model.save_pretrained(target)
        if processor is not None:
            processor.save_pretrained(target)
        (target / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n",
                                          encoding="utf-8")
        progress.update()
    print(report)
    if not report.collapsed:
        print(f"note: no block was within τ = {report.threshold} of α = 1; {target} is not smaller than {source}")
    return 0


# ------------------------------------------------------------------------------------------------------- plan


def configure_plan(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="a saved model with its tokenizer")
    parser.add_argument("--data", required=True, help="calibration data: .txt (one example a line), .csv, .json(l)")
    parser.add_argument("--output", required=True, metavar="PLAN_DIR", help="where to write the plan")
    parser.add_argument("--text-column", default="text", help="column holding the text (csv/json)")
    parser.add_argument("--label-column", default=None, help="column of integer labels: measure the task loss")
    parser.add_argument("--num-samples", type=int, default=256, help="calibration examples to use")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (padded/truncated)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--units", default="mlp",
                        help="unit kinds to consider, comma-separated: mlp (MLP blocks), layer (a decoder layer), "
                             "span (consecutive decoder layers); layers and spans alone give a stock checkpoint "
                             "(default: mlp)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--num-blocks", type=int, help="collapse the N cheapest MLP blocks")
    budget.add_argument("--params-fraction", type=float, help="remove at least this fraction of the parameters")
    budget.add_argument("--num-params", type=int, help="remove at least this many parameters")
    budget.add_argument("--max-loss-increase", type=float, help="largest accepted increase of the objective")


def _calibration_batches(args: argparse.Namespace, directory: Path) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise CLIError("reading --data needs the datasets library: pip install 'hf-layercollapse[data]'") from None
    import torch
    from transformers import AutoTokenizer

    path = Path(args.data)
    if not path.is_file():
        raise CLIError(f"{args.data}: no such file")
    kind = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix)
    if kind is None:
        raise CLIError(f"{args.data}: use a .txt, .csv, .json or .jsonl file")
    rows = datasets.load_dataset(kind, data_files=str(path), split="train")
    if args.text_column not in rows.column_names:
        raise CLIError(f"{args.data} has no column {args.text_column!r} (columns: {rows.column_names})")
    rows = rows.select(range(min(args.num_samples, len(rows))))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(list(rows[args.text_column]), padding="max_length", truncation=True,
                        max_length=args.max_length, return_tensors="pt")
    if args.label_column:
        encoded["labels"] = torch.tensor(list(rows[args.label_column]))
    return [{k: v[i:i + args.batch_size] for k, v in encoded.items()} for i in range(0, len(rows), args.batch_size)]


def run_plan(args: argparse.Namespace) -> int:
    from .planner import plan_collapse

    source = _checkpoint_dir(args.model)
    config = _load_config(source, require_record=False)
    batches = _calibration_batches(args, source)
    model = _load_model(source, config)
    plan = plan_collapse(model, batches, num_blocks=args.num_blocks, params_fraction=args.params_fraction,
                         num_params=args.num_params, max_loss_increase=args.max_loss_increase, units=args.units)
    plan.save(args.output)
    print(plan)
    print(f"plan written to {args.output}; apply it with: {PROG} collapse {args.model} OUT_DIR --plan {args.output}")
    return 0


# ------------------------------------------------------------------------------------------------ card / push


def _add_card_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model card")
    group.add_argument("--base-model", default=None, help="Hub id of the original model (license is read from it)")
    group.add_argument("--license", default=None, help="license id (default: the base model's)")
    group.add_argument("--dataset", action="append", default=None, help="training dataset id (repeatable)")
    group.add_argument("--tag", action="append", default=None, help="extra tag (repeatable)")
    group.add_argument("--model-name", default=None, help="title and model-index name")
    group.add_argument("--eval-results", default=None, metavar="JSON",
                       help='file with {"task_type", "dataset_type", "dataset_name", "metrics": '
                            '{"accuracy": {"before": x, "after": y}}} (or a list of those)')
    group.add_argument("--training-info", default=None, metavar="JSON",
                       help='file with extra training settings, e.g. {"steps": 2000, "learning_rate": 1e-4}')
    group.add_argument("--template", default=None, metavar="PATH", help="a Jinja model card template of your own")


def configure_card(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="a collapsed checkpoint directory")
    parser.add_argument("--output", default=None, help="where to write the card (default: DIR/README.md)")
    parser.add_argument("--repo-id", default=None, help="the repo id shown in the usage snippet")
    parser.add_argument("--no-chart", action="store_true", help="do not draw layercollapse_chart.png")
    _add_card_arguments(parser)


def run_card(args: argparse.Namespace) -> int:
    from .card import CHART_FILE, build_collapse_report, render_model_card, save_collapse_chart

    directory = _checkpoint_dir(args.directory)
    options = _card_options(args)
    model = _load_model(directory, _load_config(directory))
    report = _saved_report(directory, model)
    if report is None:
        report = build_collapse_report(model)
    options.setdefault("model_name", directory.resolve().name)
    output = Path(args.output) if args.output else directory / "README.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    chart_file = None
    if not args.no_chart:
        try:
            save_collapse_chart(report, output.parent / CHART_FILE)
            chart_file = CHART_FILE
        except ImportError:
            logging.getLogger(__name__).warning("matplotlib is not installed: the card has no chart.")
    card = render_model_card(model, report, repo_id=args.repo_id, chart_file=chart_file, **options)
    card.save(output)
    print(f"wrote {output}")
    return 0


def configure_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="a collapsed checkpoint directory")
    parser.add_argument("repo_id", metavar="REPO_ID", help="namespace/name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", default=None,
                        help="Hub write token (default: HF_TOKEN or the stored login; prefer HF_TOKEN: command "
                             "lines end up in shell histories)")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", default=None, help="commit title")
    _add_card_arguments(parser)


def run_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    directory = _checkpoint_dir(args.directory)
    options = _card_options(args)
    token = args.token or os.environ.get("HF_TOKEN") or None
    with tqdm(total=2, desc="push", unit="step", file=sys.stderr) as progress:
        model = _load_model(directory, _load_config(directory), progress)
        processor = _load_processor(directory)
        report = _saved_report(directory, model)
        progress.update()
        progress.set_postfix_str(f"uploading to {args.repo_id}")
        info = push_to_hub(model, args.repo_id, processor, report=report, private=args.private or None,
                           revision=args.revision, create_pr=args.create_pr, token=token,
                           commit_message=args.commit_message, **options)
        progress.update()
    print(info.pr_url or info.commit_url)
    return 0


# ----------------------------------------------------------------------------------------------------- export


def configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="CHECKPOINT_DIR", help="a saved model (collapsed or not)")
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx",
                        help="write an ONNX file (dynamic batch and sequence axes; causal LMs without KV cache)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest accepted |onnxruntime - PyTorch| difference of the outputs (default: 1e-4)")
    parser.add_argument("--no-verify", action="store_true", help="do not check the file in onnxruntime")


def run_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    directory = _checkpoint_dir(args.directory)
    with tqdm(total=2, desc="export", unit="step", file=sys.stderr) as progress:
        model = _load_model(directory, _load_config(directory, require_record=False), progress)
        progress.update()
        progress.set_postfix_str(f"exporting to {args.onnx}")
        result = export_onnx(model, args.onnx, opset=args.opset, verify=not args.no_verify, atol=args.atol)
        progress.update()
    print(result)
    return 0


Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
#: name → (add the arguments, run, one-line help).
COMMANDS: dict[str, Command] = {
    "plan": (configure_plan, run_plan, "choose blocks to collapse without fine-tuning, from calibration data"),
    "inspect": (configure_inspect, run_inspect,
                "list the MLP blocks of a model, their α, and what collapsing them would save"),
    "collapse": (configure_collapse, run_collapse, "merge the blocks of a saved injected model whose α reached 1"),
    "card": (configure_card, run_card, "render the model card (README.md) and chart of a collapsed checkpoint"),
    "push": (configure_push, run_push, "upload a collapsed checkpoint with its model card to the Hub (one commit)"),
    "export": (configure_export, run_export,
               "export a saved model to ONNX and check its outputs in onnxruntime against PyTorch"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-layercollapse``."""
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="LayerCollapse for Hugging Face Transformers: inspect models, collapse fine-tuned "
        "checkpoints, write model cards and share them on the Hub.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (configure, run, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        configure(command)
        command.set_defaults(run=run)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which tests and tools may swap after the handler was made)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    known = (CLIError, ValueError, OSError, PermissionError)
    return text if isinstance(err, known) else f"{type(err).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-layercollapse`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        hf-layercollapse ...
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    logger = logging.getLogger("hf_layercollapse")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
