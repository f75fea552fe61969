"""The collapse plan: what a model's ``config.layercollapse`` records about its injected and collapsed blocks.

The plan is what makes a checkpoint self-describing: ``from_pretrained`` rebuilds the collapsed structure and
re-injects collapsible activations from it (see :mod:`hf_layercollapse.modeling`). Block names in the plan are
relative to the model's base model (``model.base_model``), so a checkpoint saved from
``BertForSequenceClassification`` also loads into ``AutoModel``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .architectures import Layout

PLAN_KEY = "layercollapse"
#: Newest plan format this version reads. Format 2: an injected block may carry a fitted line (``"line": true``,
#: whose buffers an older reader would drop silently); format 3: an affine target (``"affine": true``, whose
#: parameters and blend an older reader would drop). Plans are written in the oldest format that holds them.
PLAN_FORMAT = 3


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` of ``root`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def base_prefix(model: nn.Module) -> str:
    """Name of the base model inside ``model`` (``"bert"`` for ``BertForSequenceClassification``), or ``""``."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""


def to_base_name(model: nn.Module, name: str) -> str:
    prefix = base_prefix(model)
    if not prefix:
        return name
    if not name.startswith(prefix + "."):
        raise ValueError(
            f"MLP block {name!r} lies outside the base model {prefix!r}: it cannot be recorded in the checkpoint. "
            f"Leave it out: LayerCollapseConfig(exclude_modules=[{name!r}]) when injecting, and not in a plan's "
            "selected blocks."
        )
    return name[len(prefix) + 1:]


def plan_format(plan: dict[str, Any]) -> int:
    """The oldest format that holds ``plan``: 3 with an injected affine target, 2 with an injected fitted line, else 1
    (a collapsed block needs neither, so collapsing every such block lets older readers load the checkpoint)."""
    entries = plan["blocks"].values()
    if any(e.get("affine") for e in entries):
        return 3
    return 2 if any(e.get("line") for e in entries) else 1


def hub_model_id(name: str | None) -> str | None:
    """``name`` when it can only be a Hub model id (a valid repo id that is no local path), else ``None``.

    Example:
        >>> hub_model_id("sentence-transformers/all-MiniLM-L6-v2"), hub_model_id("/home/me/runs/bert")
        ('sentence-transformers/all-MiniLM-L6-v2', None)
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def get_plan(model: nn.Module) -> dict[str, Any] | None:
    """The plan recorded in ``model.config``, or ``None`` when nothing was injected or collapsed."""
    return getattr(getattr(model, "config", None), PLAN_KEY, None)


def record_block(model: nn.Module, name: str, layout: Layout, state: str, config=None, **info: Any) -> None:
    """Record block ``name`` (relative to ``model``) as ``state`` ("injected" or "collapsed") in the plan.

    Models without a ``transformers`` config (plain ``nn.Module``) keep no plan.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return
    from . import __version__
    from .modeling import mark_model

    plan = get_plan(model)
    if plan is None:
        plan = {"format": 1, "blocks": {}}
    plan["library_version"] = __version__
    plan["base_model_type"] = model.config.model_type
    plan.setdefault("base_architecture", type(model).__name__)
    # a local directory is not recorded: it means nothing elsewhere, and a checkpoint pushed to the Hub would show it
    plan.setdefault("base_model_name_or_path", hub_model_id(getattr(model, "name_or_path", None)))
    if config is not None:
        plan["config"] = config.to_dict()
    plan["blocks"][to_base_name(model, name)] = {"state": state, "layout": layout.to_dict(), **info}
    plan["format"] = plan_format(plan)
    setattr(model.config, PLAN_KEY, plan)
    mark_model(model)
