"""Model cards for collapsed models: the collapse report, a chart, and a card rendered from a Jinja template.

The card is built with ``huggingface_hub.ModelCard.from_template`` from ``model_cards/layercollapse.md`` (or
a template of your own, see :func:`render_model_card` for the variables it receives). Its YAML metadata has
``library_name``, ``base_model``, ``tags``, ``datasets``, ``pipeline_tag``, ``license`` (inherited from the
base model when it can be read) and a ``model-index`` with the evaluation results before and after collapsing.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto import modeling_auto
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from .activation import injected_activations
from .checkpoint import INSTALL_HINT, original_class
from .collapse import in_model_order, model_params, unselected_rows
from .modules import PROJECTIONS, base_prefix, join, projection_shape
from .record import CollapseRecord, hub_model_id
from .report import BlockReport, CollapseReport
from .targets import target_for
from .units import table_units

logger = logging.getLogger(__name__)

REPORT_FILE = "layercollapse_report.json"
CHART_FILE = "layercollapse_chart.png"
TEMPLATE_NAME = "layercollapse.md"
DEFAULT_TAGS = ("layercollapse", "pruning", "compression")
PAPER_URL = "https://arxiv.org/abs/2311.17943"
CITATION = """@misc{zibakhshshabgahi2023layercollapse,
  title         = {LayerCollapse: Adaptive compression of neural networks},
  author        = {Zibakhsh Shabgahi, Soheil and Shariff, Mohammad Sohail and Koushanfar, Farinaz},
  year          = {2023},
  eprint        = {2311.17943},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2311.17943}
}"""
_SECRET_KEY = re.compile(r"token|secret|password|api_key", re.IGNORECASE)
# Preferred Auto class per architecture name when several mappings know it (AutoModelForPreTraining last).
_AUTO_ORDER = ("AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM",
               "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
               "AutoModelForQuestionAnswering", "AutoModelForImageClassification", "AutoModelForSpeechSeq2Seq")
_PIPELINE_TAGS = {
    "AutoModel": "feature-extraction", "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask", "AutoModelForSeq2SeqLM": "text2text-generation",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering", "AutoModelForImageClassification": "image-classification",
    "AutoModelForSpeechSeq2Seq": "automatic-speech-recognition", "AutoModelForCTC": "automatic-speech-recognition",
    "AutoModelForAudioClassification": "audio-classification", "AutoModelForObjectDetection": "object-detection",
    "AutoModelForZeroShotImageClassification": "zero-shot-image-classification",
}
# What the collapsible activation is at α = 0, by activation.
_AT_ZERO = {"blend": "which leaves the block as it was at α = 0",
            "prelu": "the paper's PReLU of slope α, which replaces the original activation (a ReLU at α = 0)"}
# The merges the calibration planner chooses from (CollapsePlan methods).
_PLANNED_METHODS = {
    "exact": "the exact merge W₂·W₁ (the activation made the identity)",
    "least_squares": "the affine map closest to the block's output on calibration data (least squares)",
    "relative_least_squares": ("the affine map closest to the block's output on calibration data, each token "
                               "weighted by the size of its output (relative least squares)"),
    "constant_gate": "the gate fixed at its mean on calibration data",
    "fitted_gate": "the gate fixed at its least-squares constant on calibration data",
}
_TRAINING_LABELS = {"reg_weight": "λ (weight of λ·Σ(1−α)²)", "threshold": "τ (collapse when |1−α| ≤ τ)",
                    "activation": "collapsible activation", "init_alpha": "initial α",
                    "linear_target": ("linear target at α = 1 (default: identity / mean gate; fitted: least squares; "
                                      "affine: the block's least-squares affine map)"),
                    "layers_to_transform": "layers_to_transform", "target_modules": "target_modules",
                    "exclude_modules": "exclude_modules"}


def default_template_path() -> Path:
    """The bundled card template, ``hf_layercollapse/model_cards/layercollapse.md``: in wheels a file, in the source
    tree a link to the top-level ``model_cards/`` (read directly where links are not checked out, e.g. Windows)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "model_cards", here.parent / "model_cards"):
        if (folder / TEMPLATE_NAME).is_file():
            return folder / TEMPLATE_NAME
    raise FileNotFoundError(f"The model card template {TEMPLATE_NAME} is missing from {here}/model_cards: "
                            "reinstall hf-layercollapse.")


def require_record(model: nn.Module) -> CollapseRecord:
    """The collapse record of ``model``; a ``ValueError`` when the model was never injected or collapsed."""
    record = CollapseRecord.of(model) if isinstance(model, PreTrainedModel) else None
    if record is None or not record.units:
        raise ValueError(
            f"{type(model).__name__} is not a LayerCollapse model (its config has no 'layercollapse' record): "
            "inject it with get_collapse_model, fine-tune, and collapse it with collapse_model first."
        )
    return record


def _original_model(model: PreTrainedModel) -> PreTrainedModel:
    """The uncollapsed architecture of ``model``, built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return original_class(model)(copy.deepcopy(model.config))




def projection_flops(model: nn.Module) -> int:
    """FLOPs per token of every ``nn.Linear``/``Conv1D`` of ``model`` (2·in·out each; attention scores excluded)."""
    return sum(2 * math.prod(projection_shape(m)) for m in model.modules() if isinstance(m, PROJECTIONS))


def build_collapse_report(model: PreTrainedModel) -> CollapseReport:
    """Rebuild the :class:`~hf_layercollapse.CollapseReport` of a collapsed model from its record alone.

    Useful for a model loaded from a checkpoint, when the report of :func:`~hf_layercollapse.collapse_model` is
    gone. The "before" numbers come from the uncollapsed architecture rebuilt on the meta device, so they count
    the original model (without the α parameters that injection added).

    Example:
        >>> import hf_layercollapse as hlc
        >>> from transformers import BertConfig, BertModel
        >>> model = hlc.get_collapse_model(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...                                 num_attention_heads=2, intermediate_size=64)))
        >>> _ = hlc.injected_activations(model)["encoder.layer.1"].alpha.data.fill_(1.0)
        >>> _ = hlc.collapse_model(model)
        >>> report = build_collapse_report(model)
        >>> [(b.name, b.status) for b in report.blocks]
        [('encoder.layer.0', 'kept'), ('encoder.layer.1', 'collapsed')]
    """
    record = require_record(model)
    original = _original_model(model)
    prefix, live = base_prefix(model), injected_activations(model)
    threshold = record.threshold
    report = CollapseReport(model_params_before=model_params(original), model_params_after=model_params(model),
                            threshold=threshold)
    for name, entry in record.units.items():
        full = join(prefix, name)
        if entry.state == "collapsed":
            owner = original.base_model.get_submodule(name) if name else original.base_model
            costs = entry.layout.costs(owner, entry.bias)
            report.blocks.append(BlockReport(full, entry.layout.kind.value, entry.alpha, "collapsed",
                                             entry.method or "", *costs))
            continue
        owner = model.get_submodule(full) if full else model
        params, _, flops, _ = entry.layout.costs(owner, True)
        alpha = live[full].alpha_value if full in live else None
        reason = "not collapsed"
        if alpha is not None and threshold is not None and abs(1 - alpha) > threshold:
            reason = f"|1-α| = {abs(1 - alpha):.4f} > {threshold}"
        report.blocks.append(BlockReport(full, entry.layout.kind.value, alpha, "kept", reason, params, params, flops,
                                         flops))
    reported = {b.name for b in report.blocks}  # + the blocks never injected (layers_to_transform, a plan's choice)
    # (from the table on the uncollapsed architecture; a model type outside it would need tracing, a forward pass)
    never = [u for u in table_units(original) or [] if u.name not in reported]
    report.blocks = in_model_order(model, report.blocks + unselected_rows(model, never))
    return report


def report_covers_plan(report: CollapseReport, model: PreTrainedModel) -> bool:
    """Whether ``report`` lists exactly the blocks that the model's record says are collapsed.

    A report of a later step of a progressive collapse covers only that step's blocks.
    """
    collapsed = list(require_record(model).collapsed())
    reported = [b.name for b in report.collapsed]
    return len(collapsed) == len(reported) and all(
        any(r == p or r.endswith("." + p) for r in reported) for p in collapsed)


def load_collapse_report(path: str | os.PathLike) -> CollapseReport:
    """Read a report written as ``CollapseReport.to_dict()`` JSON (``layercollapse_report.json``).

    Example:
        >>> import json, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.json"
        >>> _ = path.write_text(json.dumps(CollapseReport(model_params_before=10, model_params_after=7).to_dict()))
        >>> load_collapse_report(path).params_saved
        3
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    fields = BlockReport.__dataclass_fields__
    try:
        blocks = [BlockReport(**{k: b[k] for k in fields}) for b in data["blocks"]]
        return CollapseReport(blocks, int(data["model_params_before"]), int(data["model_params_after"]),
                              data.get("threshold"))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a LayerCollapse report (missing {err}).") from None


def save_collapse_chart(report: CollapseReport, path: str | os.PathLike) -> Path:
    """Draw α per block and the model's parameters before/after into a PNG (matplotlib, Agg; byte-reproducible).

    Example:
        >>> import tempfile, pathlib
        >>> from hf_layercollapse import BlockReport
        >>> report = CollapseReport([BlockReport("layer.0", "plain", 1.0, "collapsed", "", 10, 4, 20, 8)], 30, 24)
        >>> save_collapse_chart(report, pathlib.Path(tempfile.mkdtemp()) / "chart.png").stat().st_size > 0
        True
    """
    from matplotlib.figure import Figure  # Figure without pyplot renders with Agg and keeps no global state

    names = _short_names([b.name for b in report.blocks])
    alphas = [b.alpha if b.alpha is not None else 0.0 for b in report.blocks]
    colors = {"collapsed": "#2a9d8f", "kept": "#8d99ae", "skipped": "#e76f51"}
    fig = Figure(figsize=(max(6.0, 3.5 + 0.35 * len(names)), 3.6), dpi=100)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(2, len(names)), 2]})
    left.bar(range(len(names)), alphas, color=[colors.get(b.status, "#8d99ae") for b in report.blocks])
    left.axhline(1.0, color="black", linewidth=0.8)
    if report.threshold is not None:
        left.axhline(1.0 - report.threshold, color="black", linewidth=0.8, linestyle="--")
    left.set_xticks(range(len(names)), names, rotation=90 if len(names) > 6 else 0, fontsize=8)
    left.set_ylim(0, 1.05)
    left.set_title("α per MLP block (green: collapsed; dashed: 1 − τ)", fontsize=10)
    values = [report.model_params_before, report.model_params_after]
    right.bar(["before", "after"], values, color=["#8d99ae", "#2a9d8f"])
    for x, value in enumerate(values):
        right.annotate(_human(value), (x, value), ha="center", va="bottom", fontsize=8)
    right.set_title("model parameters", fontsize=10)
    right.set_ylim(0, max(*values, 1) * 1.15)
    right.ticklabel_format(axis="y", style="sci", scilimits=(0, 3))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _short_names(names: list[str]) -> list[str]:
    """Block names without their common leading components (``encoder.layer.11`` → ``layer.11``)."""
    if len(names) < 2:
        return names
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 2 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:,.0f}"


def auto_class_for(config: PretrainedConfig, architecture: str | None = None) -> type[_BaseAutoModelClass]:
    """The ``AutoModelFor...`` class that builds ``architecture`` (default: ``config.architectures[0]``).

    Falls back to ``AutoModel`` when no mapping knows the architecture.

    Example:
        >>> from transformers import GPT2Config
        >>> auto_class_for(GPT2Config(), "GPT2LMHeadModel").__name__
        'AutoModelForCausalLM'
    """
    record = CollapseRecord.of(config)
    model_type = record.base_model_type if record is not None else config.model_type
    architecture = architecture or (getattr(config, "architectures", None) or [None])[0]
    matches = []
    for auto in vars(modeling_auto).values():
        if not (isinstance(auto, type) and issubclass(auto, _BaseAutoModelClass)):
            continue
        mapping = getattr(auto, "_model_mapping", None)
        names = getattr(mapping, "_model_mapping", {}).get(model_type) if mapping is not None else None
        if architecture is not None and architecture in ((names,) if isinstance(names, str) else names or ()):
            matches.append(auto)
    if not matches:
        return modeling_auto.AutoModel

    def rank(auto: type) -> int:
        name = auto.__name__
        if name in _AUTO_ORDER:
            return _AUTO_ORDER.index(name)
        return len(_AUTO_ORDER) + (name == "AutoModelForPreTraining")

    return min(matches, key=rank)


def _architecture(model: PreTrainedModel) -> str:
    return (getattr(model.config, "architectures", None) or [type(model).__name__])[0]


def _guess_base_model(model: PreTrainedModel) -> str | None:
    """The Hub id of the original model: the record's ``base_model_name_or_path`` (``None`` when it was loaded from a
    local directory), when it is a Hub id (not a local path)."""
    record = CollapseRecord.of(model)
    return hub_model_id(record.base_model_name_or_path if record is not None else model.config._name_or_path)


def _base_model_license(base_model: str, token: str | bool | None) -> dict[str, Any]:
    """``license`` (and ``license_name``/``license_link``) from the base model's card on the Hub, else ``{}``."""
    from huggingface_hub import HfApi

    try:
        card = HfApi(token=token).model_info(base_model, timeout=10).card_data
    except Exception as err:  # offline, private or missing: the license is just unknown
        logger.info("Could not read the license of base model %s: %s", base_model, type(err).__name__)
        return {}
    keys = ("license", "license_name", "license_link")
    return {k: getattr(card, k, None) for k in keys if card is not None and getattr(card, k, None)}


def _eval_results(eval_results: Any) -> tuple[list[EvalResult], list[dict[str, str]]]:
    """``model-index`` entries and card rows from ``eval_results`` (see :func:`render_model_card`)."""
    if not eval_results:
        return [], []
    if isinstance(eval_results, Mapping):
        eval_results = [eval_results]
    if all(isinstance(e, EvalResult) for e in eval_results):
        rows = [{"dataset": e.dataset_name, "metric": e.metric_name or e.metric_type, "before": "",
                 "after": _fmt(e.metric_value), "change": ""} for e in eval_results]
        return list(eval_results), rows
    results, rows = [], []
    for entry in eval_results:
        missing = [k for k in ("task_type", "dataset_type", "dataset_name", "metrics") if k not in entry]
        if missing:
            raise ValueError(f"eval_results entry {entry!r} lacks {missing}; see render_model_card's docstring.")
        common = {k: entry[k] for k in ("task_type", "dataset_type", "dataset_name", "dataset_config",
                                        "dataset_split", "task_name") if entry.get(k) is not None}
        for metric, values in entry["metrics"].items():
            values = values if isinstance(values, Mapping) else {"after": values}
            if "after" not in values:
                raise ValueError(f"eval_results metric {metric!r} has no 'after' value: {values!r}.")
            results.append(EvalResult(metric_type=metric, metric_value=values["after"], metric_name=metric, **common))
            before = values.get("before")
            if before is not None:
                results.append(EvalResult(metric_type=metric, metric_value=before,
                                          metric_name=f"{metric} (before LayerCollapse)", **common))
            change = "" if before is None else f"{values['after'] - before:+.4g}"
            rows.append({"dataset": _cell(entry["dataset_name"]), "metric": _cell(metric), "before": _fmt(before),
                         "after": _fmt(values["after"]), "change": change})
    return results, rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _training_rows(record: CollapseRecord, training_info: Mapping[str, Any] | None) -> list[dict[str, str]]:
    recorded = record.config.settings() if record.config is not None else {}
    settings = {k: v for k, v in recorded.items() if k in _TRAINING_LABELS}
    for key, value in (training_info or {}).items():
        if _SECRET_KEY.search(key):
            logger.warning("training_info[%r] looks like a credential and is left out of the model card.", key)
            continue
        settings[key] = value
    return [{"setting": _cell(_TRAINING_LABELS.get(k, k)), "value": _cell(_fmt(v))}
            for k, v in settings.items() if v is not None]


def _cell(text: str) -> str:
    """``text`` made safe for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _change(before: int, after: int) -> str:
    return f"{100 * (after - before) / before:+.2f}%" if before else ""


def card_variables(model: PreTrainedModel, report: CollapseReport, **options: Any) -> dict[str, Any]:
    """Everything the template sees besides ``card_data`` (see :func:`render_model_card`)."""
    record = require_record(model)
    original = _original_model(model)
    auto = auto_class_for(model.config, _architecture(model))
    collapsed = report.collapsed
    before, after = report.model_params_before, report.model_params_after
    lin_before, lin_after = projection_flops(original), projection_flops(model)
    compression = [
        {"label": "parameters", "before": f"{before:,}", "after": f"{after:,}", "change": _change(before, after)},
        {"label": "FLOPs/token, collapsed MLP blocks", "before": f"{report.flops_before:,}",
         "after": f"{report.flops_after:,}", "change": _change(report.flops_before, report.flops_after)},
        {"label": "FLOPs/token, all projections (≈)", "before": f"{lin_before:,}", "after": f"{lin_after:,}",
         "change": _change(lin_before, lin_after)},
    ]
    entries = list(record.collapsed().values())
    methods = [e.method for e in entries]  # None: fine-tuned until linear; else the planner's merge
    settings = record.config
    activation = settings.activation if settings is not None else "blend"
    linear_target = settings.linear_target if settings is not None else "default"
    affine_rank = settings.affine_rank if settings is not None else None
    trained = [e for e in entries if not e.method] or list(record.units.values())  # none yet: the injected ones
    kinds = sorted({e.layout.kind.value: e.layout for e in trained}.items(), reverse=True)  # plain first
    trained_targets = list(dict.fromkeys(target_for(layout, linear_target, activation, affine_rank).describe()
                                         for _, layout in kinds))
    every_block = table_units(original)  # a report of collapse_model lists only the injected blocks
    blocks = [{"name": _cell(b.name), "kind": b.kind, "alpha": "-" if b.alpha is None else f"{b.alpha:.4f}",
               "status": _cell(b.status if not b.reason else f"{b.status} ({b.reason})"),
               "params": f"{b.params_before:,} → {b.params_after:,}",
               "flops": f"{b.flops_before:,} → {b.flops_after:,}"} for b in report.blocks]
    return {
        "report": report.to_dict(), "blocks": blocks, "compression": compression,
        "num_blocks": len(every_block) if every_block else len(report.blocks), "num_collapsed": len(collapsed),
        # fine-tuned until linear (no method recorded) or merged by the calibration planner (its method)
        "num_trained": methods.count(None), "num_planned": len(methods) - methods.count(None),
        "trained_target": "; ".join(trained_targets),
        "alpha_at_zero": _AT_ZERO.get(activation, _AT_ZERO["blend"]),
        "planned_methods": [_PLANNED_METHODS.get(m, m) for m in sorted({m for m in methods if m})],
        "params_before": before, "params_after": after, "params_saved": report.params_saved,
        "params_saved_pct": f"{100 * report.params_saved / before:.2f}%" if before else "0%",
        "threshold": report.threshold, "base_model_type": record.base_model_type,
        "architecture": _architecture(model), "auto_class": auto.__name__, "library_version": record.library_version,
        "install_command": INSTALL_HINT, "paper_url": PAPER_URL, "citation": CITATION,
        **options,
    }


def render_model_card(
    model: PreTrainedModel,
    report: CollapseReport | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    datasets: str | list[str] | None = None,
    tags: list[str] | None = None,
    pipeline_tag: str | None = None,
    eval_results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | Sequence[EvalResult] | None = None,
    training_info: Mapping[str, Any] | None = None,
    template_path: str | os.PathLike | None = None,
    chart_file: str | None = CHART_FILE,
    token: str | bool | None = None,
) -> ModelCard:
    """The model card (``README.md``) of a collapsed model, rendered from a Jinja template.

    Args:
        model: The collapsed model (its ``config.layercollapse`` record is read).
        report: What :func:`~hf_layercollapse.collapse_model` returned; default: :func:`build_collapse_report`.
        repo_id: Where the model goes on the Hub (used in the usage snippet and as default ``model_name``).
        model_name: Title and ``model-index`` name; default: the name part of ``repo_id``.
        base_model: Hub id of the original model; default: ``config._name_or_path`` when it is a Hub id.
        license: Default: the base model's license, read from the Hub (left out when it cannot be read).
        datasets, tags, pipeline_tag: Card metadata; ``tags`` are added to layercollapse/pruning/compression
            and the base ``model_type``; ``pipeline_tag`` defaults to the one of the model's Auto class.
        eval_results: ``{"task_type", "dataset_type", "dataset_name", ["dataset_config", "dataset_split"],
            "metrics": {name: {"before": x, "after": y}}}`` or a list of those (``model-index`` gets both
            values; "before" is named ``"<metric> (before LayerCollapse)"``), or a list of ``EvalResult``.
        training_info: Extra rows for "Training" (``{"steps": 2000, "learning_rate": 1e-4}``); λ, τ and the
            activation come from the record. Keys that look like credentials are dropped.
        template_path: A Jinja template of your own. It gets ``card_data`` (the YAML) and the variables of
            :func:`card_variables`: ``model_name``, ``repo_id``, ``base_model``, ``compression`` and ``blocks``
            (rows of preformatted strings), ``report`` (``CollapseReport.to_dict()``), ``num_blocks``,
            ``num_collapsed``, ``num_trained`` / ``num_planned`` (collapsed by fine-tuning / by the planner),
            ``trained_target``, ``alpha_at_zero``, ``planned_methods`` (phrases), ``training``, ``eval_table``,
            ``chart_file``, ``auto_class``, ``install_command``, ``citation``, ...
        chart_file: File name of the chart the card shows (``None``: no chart).
        token: Used only to read the base model's license.

    Example:
        >>> import hf_layercollapse as hlc
        >>> from transformers import BertConfig, BertModel
        >>> model = hlc.get_collapse_model(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...                                 num_attention_heads=2, intermediate_size=64)))
        >>> for act in hlc.injected_activations(model).values():
        ...     _ = act.alpha.data.fill_(1.0)
        >>> report = hlc.collapse_model(model)
        >>> card = render_model_card(model, report, repo_id="me/tiny-bert-collapsed", license="apache-2.0")
        >>> card.data.library_name, card.data.tags[:3]
        ('transformers', ['layercollapse', 'pruning', 'compression'])
    """
    record = require_record(model)
    report = report if report is not None else build_collapse_report(model)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else f"{model.config.model_type}-layercollapse")
    base_model = base_model or _guess_base_model(model)
    licensing = {"license": license} if license else (_base_model_license(base_model, token) if base_model else {})
    results, eval_table = _eval_results(eval_results)
    auto = auto_class_for(model.config, _architecture(model))
    card_data = ModelCardData(
        library_name="transformers", base_model=base_model, datasets=datasets,
        tags=[*DEFAULT_TAGS, record.base_model_type, *(tags or [])],
        pipeline_tag=pipeline_tag or _PIPELINE_TAGS.get(auto.__name__), eval_results=results or None,
        model_name=model_name, **licensing,
    )
    variables = card_variables(
        model, report, model_name=model_name, repo_id=repo_id or f"your-name/{model_name}", base_model=base_model,
        eval_table=eval_table, training=_training_rows(record, training_info), chart_file=chart_file,
    )
    template = Path(template_path) if template_path is not None else default_template_path()
    if not template.is_file():
        raise FileNotFoundError(f"Model card template {template} does not exist.")
    return ModelCard.from_template(card_data, template_path=str(template), **variables)
