"""The collapse record: what a model's ``config.layercollapse`` says about its injected and collapsed units.

The record makes a checkpoint self-describing: ``from_pretrained`` rebuilds the collapsed structure and re-injects
collapsible activations from it (:mod:`hf_layercollapse.checkpoint`). It is typed here (:class:`CollapseRecord`, one
:class:`UnitRecord` per unit) and stored in ``config.json`` as plain JSON, in the oldest format that holds it:
format 1 for identity, PReLU and gate-constant targets and for collapsed units, 2 when an injected unit has a fitted
line (whose buffers an older reader would drop silently), 3 when one has an affine target, 4 when one has a low-rank
affine target. Unit names are relative
to the model's base model (``model.base_model``), so a checkpoint saved from ``BertForSequenceClassification`` also
loads into ``AutoModel``. (The planner's result, what to merge before anything is merged, is a
:class:`~hf_layercollapse.CollapsePlan`, not a record.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .config import CollapseConfig
from .errors import LayerCollapseConfigError
from .targets import LinearTarget, target_from_record
from .units import Layout
from .version import __version__

#: The key of the record in ``config.json``.
RECORD_KEY = "layercollapse"
#: Newest record format this version reads.
RECORD_FORMAT = 4
STATES = ("injected", "collapsed")


@dataclass
class UnitRecord:
    """One unit of a :class:`CollapseRecord`: injected (its target) or collapsed (the merged projection)."""

    state: str
    layout: Layout
    target: LinearTarget | None = None  # injected: what the unit blends towards
    alpha: float | None = None  # collapsed: α when it was merged (None for the planner's merges without α)
    in_features: int | None = None  # collapsed: the merged projection
    out_features: int | None = None
    bias: bool = True
    projection: str | None = None  # "Linear" or "Conv1D"
    method: str | None = None  # collapsed by the calibration planner: its merge

    @property
    def format(self) -> int:
        return self.target.record_format if self.target is not None else 1

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"state": self.state, "layout": self.layout.to_dict()}
        if self.state == "injected":
            return {**data, **self.target.record()}
        data.update(alpha=self.alpha, in_features=self.in_features, out_features=self.out_features, bias=self.bias,
                    projection=self.projection)
        return {**data, **({"method": self.method} if self.method else {})}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> UnitRecord:
        if not isinstance(data, dict):
            raise LayerCollapseConfigError(f"{where} must be a JSON object, got {data!r}.")
        state = data.get("state")
        if state not in STATES:
            raise LayerCollapseConfigError(f"{where} has state {state!r}; it must be one of {STATES}.")
        if "layout" not in data:
            raise LayerCollapseConfigError(f"{where} has no 'layout' (where its modules sit).")
        layout = Layout.from_dict(data["layout"], f"the layout of {where}")
        if state == "injected":
            return cls(state, layout, target=target_from_record(data, layout, where))
        sizes = [data.get("in_features"), data.get("out_features")]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            raise LayerCollapseConfigError(f"{where} is collapsed but its in_features/out_features {sizes} are not "
                                           "positive integers.")
        bias, alpha = data.get("bias", True), data.get("alpha")
        if not isinstance(bias, bool) or not (alpha is None or isinstance(alpha, (int, float))):
            raise LayerCollapseConfigError(f"{where} has bias={bias!r} and alpha={alpha!r}: a boolean and a number "
                                           "(or null) are expected.")
        return cls(state, layout, alpha=alpha, in_features=sizes[0], out_features=sizes[1], bias=bias,
                   projection=data.get("projection"), method=data.get("method"))


@dataclass
class CollapseRecord:
    """What a model's config records (see the module docstring)."""

    base_model_type: str
    units: dict[str, UnitRecord] = field(default_factory=dict)
    config: CollapseConfig | None = None
    base_architecture: str | None = None
    base_model_name_or_path: str | None = None
    library_version: str = __version__

    @property
    def format(self) -> int:
        """The oldest format that holds this record."""
        return max([1, *(u.format for u in self.units.values())])

    @property
    def threshold(self) -> float | None:
        """τ of the recorded config (``None`` without one)."""
        return None if self.config is None else self.config.threshold

    def injected(self) -> dict[str, UnitRecord]:
        return {n: u for n, u in self.units.items() if u.state == "injected"}

    def collapsed(self) -> dict[str, UnitRecord]:
        return {n: u for n, u in self.units.items() if u.state == "collapsed"}

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": self.format, "blocks": {n: u.to_dict() for n, u in self.units.items()},
            "library_version": self.library_version, "base_model_type": self.base_model_type,
            "base_architecture": self.base_architecture, "base_model_name_or_path": self.base_model_name_or_path,
        }
        if self.config is not None:
            data["config"] = self.config.settings()
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "the checkpoint's config.json") -> CollapseRecord:
        """A record from its JSON form; one :class:`LayerCollapseConfigError` naming the unit (and ``source``) for
        anything malformed, and for a format newer than this version reads."""
        if not isinstance(data, dict) or not isinstance(data.get("blocks"), dict):
            raise LayerCollapseConfigError(f"The '{RECORD_KEY}' record of {source} is missing or has no 'blocks': the "
                                           "file is corrupt or was not written by hf_layercollapse.")
        version = data.get("format", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise LayerCollapseConfigError(f"The '{RECORD_KEY}' record of {source} has format {version!r}; a positive "
                                           "integer is expected: the file is corrupt.")
        if version > RECORD_FORMAT:
            raise LayerCollapseConfigError(
                f"The checkpoint's collapse record ({source}) has format {version}, newer than this hf_layercollapse "
                f"understands ({RECORD_FORMAT}); upgrade with `pip install -U hf-layercollapse`.")
        units = {name: UnitRecord.from_dict(entry, f"block {name!r} of {source}")
                 for name, entry in data["blocks"].items()}
        config = data.get("config")
        return cls(base_model_type=data.get("base_model_type"), units=units,
                   config=None if config is None else CollapseConfig.from_settings(config, source),
                   base_architecture=data.get("base_architecture"),
                   base_model_name_or_path=data.get("base_model_name_or_path"),
                   library_version=data.get("library_version", ""))

    # ------------------------------------------------------------------------------------------ on a model
    @classmethod
    def of(cls, model_or_config: Any) -> CollapseRecord | None:
        """The record of a model (or of its config), or ``None`` when nothing was injected or collapsed."""
        config = getattr(model_or_config, "config", model_or_config)
        data = getattr(config, RECORD_KEY, None)
        return None if data is None else cls.from_dict(data)

    def write(self, model: nn.Module) -> None:
        """Store the record in ``model.config`` (as JSON-ready data, which ``save_pretrained`` writes)."""
        setattr(model.config, RECORD_KEY, self.to_dict())


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
