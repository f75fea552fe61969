"""Sharing collapsed models on the Hugging Face Hub: one commit with weights, tokenizer, report, chart and card.

Pulling needs nothing from this module: ``import hf_layercollapse`` and
``AutoModelForX.from_pretrained("org/name")`` rebuild the collapsed model from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from transformers import PreTrainedModel

from .card import (
    CHART_FILE,
    REPORT_FILE,
    build_collapse_report,
    render_model_card,
    report_covers_plan,
    require_record,
    save_collapse_chart,
)
from .report import CollapseReport

logger = logging.getLogger(__name__)

#: Remote weight files that a push replaces (stale shards of an earlier upload would not match the new config).
STALE_WEIGHTS = ["model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                 "pytorch_model.bin.index.json"]


def save_for_hub(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    tokenizer_or_processor: Any = None,
    *,
    report: CollapseReport | None = None,
    chart: bool = True,
    **card_options: Any,
) -> Path:
    """Write everything :func:`push_to_hub` uploads into ``save_directory`` and return it.

    Files: the checkpoint (``model.save_pretrained``, safetensors), the tokenizer/processor, the report
    (``layercollapse_report.json``), the chart (``layercollapse_chart.png``, needs matplotlib) and
    ``README.md``. The output is byte-for-byte reproducible, so saving the same model twice gives the same files.

    Args:
        model: A collapsed model (see :func:`~hf_layercollapse.collapse_model`).
        save_directory: Created if needed; files of the same names are overwritten.
        tokenizer_or_processor: Anything with ``save_pretrained`` (tokenizer, image processor, processor).
        report: The collapse report; default: :func:`~hf_layercollapse.card.build_collapse_report`.
        chart: Draw the chart (skipped with a warning when matplotlib is missing).
        **card_options: Passed to :func:`~hf_layercollapse.card.render_model_card` (``repo_id``, ``base_model``,
            ``license``, ``datasets``, ``tags``, ``eval_results``, ``training_info``, ``template_path``, ...).

    Example:
        >>> import tempfile, hf_layercollapse as hlc
        >>> from transformers import BertConfig, BertModel
        >>> model = hlc.get_collapse_model(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...                                 num_attention_heads=2, intermediate_size=64)))
        >>> for act in hlc.injected_activations(model).values():
        ...     _ = act.alpha.data.fill_(1.0)
        >>> report = hlc.collapse_model(model)
        >>> folder = save_for_hub(model, tempfile.mkdtemp(), report=report, license="apache-2.0")
        >>> sorted(p.name for p in folder.iterdir())  # doctest: +NORMALIZE_WHITESPACE
        ['README.md', 'config.json', 'layercollapse_chart.png', 'layercollapse_manifest.json',
         'layercollapse_report.json', 'model.safetensors']
    """
    require_record(model)
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    if report is None:
        report = build_collapse_report(model)
    elif not report_covers_plan(report, model):
        logger.warning("The report does not list every collapsed block of the model (a later step of a progressive "
                       "collapse?); pass report=None to describe the whole model in the card.")
    if not report.collapsed:
        logger.warning("The model has no collapsed block: the checkpoint is only collapsible, not compressed.")
    model.save_pretrained(folder)
    if tokenizer_or_processor is not None:
        tokenizer_or_processor.save_pretrained(folder)
    (folder / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    chart_file = None
    if chart:
        try:
            save_collapse_chart(report, folder / CHART_FILE)
            chart_file = CHART_FILE
        except ImportError:
            logger.warning("matplotlib is not installed: the model card has no chart (pip install matplotlib).")
    card = render_model_card(model, report, chart_file=chart_file, **card_options)
    card.save(folder / "README.md")
    return folder


def _check_no_token(folder: Path, token: str | None) -> None:
    """Refuse to upload a folder where the token string appears in any non-weight file."""
    if not token:
        return
    needle = token.encode()
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors" and needle in path.read_bytes():
            raise ValueError(f"{path.name} contains the Hub token; refusing to upload it.")


def _explain(err: HfHubHTTPError, repo_id: str, token: str | None) -> Exception:
    status = err.response.status_code if err.response is not None else None
    if status == 401 and not token:
        return PermissionError(f"Pushing to {repo_id} needs a Hub token with write access: pass token=..., set "
                               "HF_TOKEN or run `hf auth login`.")
    if status in (401, 403):
        detail = err.server_message or str(err).splitlines()[0]
        return PermissionError(f"The Hub refused the token for {repo_id} ({status}: {detail}). Use a token with "
                               "write access to this namespace.")
    return err


def push_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    tokenizer_or_processor: Any = None,
    *,
    report: CollapseReport | None = None,
    eval_results: Mapping[str, Any] | list[Any] | None = None,
    training_info: Mapping[str, Any] | None = None,
    template_path: str | os.PathLike | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    **card_options: Any,
) -> CommitInfo:
    """Upload a collapsed model, its tokenizer/processor, report, chart and generated card in ONE commit.

    ``create_repo(exist_ok=True)``, then ``upload_folder`` of what :func:`save_for_hub` writes. Files that did not
    change are not uploaded again, so pushing the same model twice creates no second commit (the returned
    ``CommitInfo`` then points at the existing head). Earlier weight files that the new checkpoint does not
    contain (old shards) are deleted in the same commit. The token is only sent in the ``Authorization`` header:
    it is never written into a file, the card or a log message.

    Args:
        model: A collapsed model.
        repo_id: ``"namespace/name"``.
        tokenizer_or_processor: Saved next to the model when given.
        report: The :func:`~hf_layercollapse.collapse_model` report; default: rebuilt from the record.
        eval_results, training_info, template_path: See :func:`~hf_layercollapse.card.render_model_card`.
        private: Visibility when the repo is created (``None``: the namespace's default).
        revision: Branch to push to (created when missing); default ``main``.
        create_pr: Open a pull request instead of committing to the branch.
        token: A write token; default: ``HF_TOKEN`` or the stored login.
        commit_message: Default: ``"Upload LayerCollapse model (<n> collapsed blocks, -<x>% parameters)"``.
        **card_options: More :func:`~hf_layercollapse.card.render_model_card` options (``base_model``,
            ``license``, ``datasets``, ``tags``, ``pipeline_tag``, ``model_name``).

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit (``.oid``, ``.commit_url``, ``.pr_url``).

    Raises:
        PermissionError: The Hub refused the token (or none was found).

    Example:
        >>> from hf_layercollapse.hub import push_to_hub
        >>> info = push_to_hub(model, "me/bert-collapsed", tokenizer, report=report,  # doctest: +SKIP
        ...                    eval_results={"task_type": "text-classification", "dataset_type": "glue",
        ...                                  "dataset_name": "GLUE SST-2",
        ...                                  "metrics": {"accuracy": {"before": 0.9266, "after": 0.9117}}})
    """
    require_record(model)
    api = HfApi(token=token)
    report = report if report is not None else build_collapse_report(model)
    if commit_message is None:
        before = report.model_params_before
        saved = f", -{100 * report.params_saved / before:.1f}% parameters" if before else ""
        commit_message = f"Upload LayerCollapse model ({len(report.collapsed)} collapsed blocks{saved})"
    effective_token = token or get_token()
    try:  # the repo first: a refused token fails before the model is serialised
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="layercollapse_push_") as tmp:
            save_for_hub(model, tmp, tokenizer_or_processor, report=report, repo_id=repo_id,
                         eval_results=eval_results, training_info=training_info, template_path=template_path,
                         token=token, **card_options)
            _check_no_token(Path(tmp), effective_token)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr, delete_patterns=STALE_WEIGHTS)
    except HfHubHTTPError as err:
        explained = _explain(err, repo_id, effective_token)
        if explained is err:
            raise
        raise explained from None
    logger.info("Pushed %s: %s", repo_id, info.pr_url or info.commit_url)
    return info
