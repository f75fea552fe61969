"""`CollapseConfig`: which units to make collapsible, and how — the settings every checkpoint records.

:class:`~hf_layercollapse.LayerCollapseConfig` (the class users build) is this config made a ``peft.PeftConfig``
as well (:mod:`hf_layercollapse.peft`), with the PEFT-only fields (LoRA, ``modules_to_save``); the core of the library
reads only the fields defined here.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import LayerCollapseConfigError
from .targets import ACTIVATIONS, LINEAR_TARGETS

CONFIG_NAME = "layercollapse_config.json"
DEFAULT_INIT_ALPHA = {"blend": 0.0, "prelu": 0.01}
#: Fields that checkpoints written by hf_layercollapse 0.1 recorded with the settings (PEFT's bookkeeping and the
#: PEFT-only fields): read and ignored.
LEGACY_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                 "auto_mapping", "runtime_config", "modules_to_save", "lora_config")


def _number(name: str, value: Any, low: float, high: float, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LayerCollapseConfigError(f"{name}={value!r} must be a number in [{low}, {high}] ({meaning}), not a "
                                       f"{type(value).__name__}.")
    if not (math.isfinite(value) and low <= value <= high):
        raise LayerCollapseConfigError(f"{name}={value!r} must lie in [{low}, {high}] ({meaning}).")
    return float(value)


def _selector(name: str, value: Any) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise LayerCollapseConfigError(f"{name}={value!r} is not a valid regular expression: {err}") from err
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise LayerCollapseConfigError(f"{name}={value!r} must be None, a regular expression string or a list of module "
                                   "names.")


def _indices(value: Any) -> int | list[int] | None:
    if isinstance(value, (tuple, range)):
        value = list(value)
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731  (True is not an index)
    if value is None or is_int(value) or (isinstance(value, list) and all(is_int(i) for i in value)):
        return value
    raise LayerCollapseConfigError(f"layers_to_transform={value!r} must be None, an int or a list of ints "
                                   "(block indices; negative ones count from the end).")


@dataclass
class CollapseConfig:
    """The LayerCollapse settings (see :class:`~hf_layercollapse.LayerCollapseConfig` for each field)."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Blocks to make collapsible (None: every detected MLP block). Names or a regex."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Blocks to leave alone. Names or a regex, as for target_modules."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Indices of the detected MLP blocks to transform; negative indices count from the end."},
    )
    activation: str = field(
        default="blend", metadata={"help": "'blend' (α·x + (1−α)·act(x), exact at α=0) or 'prelu' (paper)."}
    )
    init_alpha: float | None = field(
        default=None, metadata={"help": "Initial α (default 0.0 for blend, 0.01 for prelu)."}
    )
    reg_weight: float = field(default=1.0, metadata={"help": "λ, weight of the regulariser λ·Σ(1−α)²."})
    threshold: float = field(default=0.05, metadata={"help": "τ: collapse a block when |1 − α| ≤ τ."})
    linear_target: str = field(
        default="default",
        metadata={"help": "What the activation becomes at α = 1: 'default' (identity; gated: c at the mean of "
                          "act(gate(x))), 'fitted' (least squares on calibration data) or 'affine' (the block "
                          "blends towards its least-squares affine map, learnable)."},
    )
    affine_rank: int | None = field(
        default=None,
        metadata={"help": "linear_target='affine' only: train a rank-r correction of the fitted map (frozen) instead "
                          "of the full d_out×d_in matrix (None)."},
    )

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise LayerCollapseConfigError(f"activation={self.activation!r} is not supported: use one of "
                                           f"{ACTIVATIONS}.")
        if self.linear_target not in LINEAR_TARGETS:
            raise LayerCollapseConfigError(f"linear_target={self.linear_target!r} is not supported: use one of "
                                           f"{LINEAR_TARGETS}.")
        if self.linear_target != "default" and self.activation != "blend":
            raise LayerCollapseConfigError(f"linear_target={self.linear_target!r} blends towards a fitted target: it "
                                           f"needs activation='blend', not {self.activation!r}.")
        if self.affine_rank is not None:
            if isinstance(self.affine_rank, bool) or not isinstance(self.affine_rank, int) or self.affine_rank < 1:
                raise LayerCollapseConfigError(f"affine_rank={self.affine_rank!r} must be None (the full matrix) or a "
                                               "positive int (the rank of the trainable correction, e.g. 16).")
            if self.linear_target != "affine":
                raise LayerCollapseConfigError(f"affine_rank={self.affine_rank!r} is the rank of the affine target's "
                                               "trainable correction: it needs linear_target='affine', not "
                                               f"{self.linear_target!r}.")
        if self.init_alpha is None:
            self.init_alpha = DEFAULT_INIT_ALPHA[self.activation]
        self.init_alpha = _number("init_alpha", self.init_alpha, 0.0, 1.0, "1 means linear")
        self.reg_weight = _number("reg_weight", self.reg_weight, 0.0, math.inf, "the weight λ of Σ(1−α)²")
        self.threshold = _number("threshold", self.threshold, 0.0, 1.0, "a block collapses when |1−α| ≤ τ")
        self.target_modules = _selector("target_modules", self.target_modules)
        self.exclude_modules = _selector("exclude_modules", self.exclude_modules)
        self.layers_to_transform = _indices(self.layers_to_transform)

    # ------------------------------------------------------------------------------------------ serialisation
    def settings(self) -> dict[str, Any]:
        """The LayerCollapse settings as a JSON-ready dict: what a checkpoint's record keeps (no PEFT fields;
        ``affine_rank`` only when set, so that checkpoints without it stay readable by versions without it)."""
        settings = {f.name: getattr(self, f.name) for f in fields(CollapseConfig)}
        if settings["affine_rank"] is None:
            del settings["affine_rank"]
        return settings

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict."""
        return self.settings()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> CollapseConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error, not silently dropped."""
        where = f" (in {source})" if source else ""
        if not isinstance(data, dict):
            raise LayerCollapseConfigError(f"A LayerCollapse config must be a JSON object of fields{where}, got "
                                           f"{type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LayerCollapseConfigError(f"Unknown LayerCollapseConfig fields {unknown}{where}; known fields are "
                                           f"{sorted(known)}.")
        try:
            return cls(**data)
        except LayerCollapseConfigError as err:
            raise LayerCollapseConfigError(f"{err}{where}") from None

    @classmethod
    def from_settings(cls, data: dict[str, Any], source: str | None = None) -> CollapseConfig:
        """The settings a checkpoint recorded (:meth:`settings`; older checkpoints also recorded PEFT's fields)."""
        if not isinstance(data, dict):
            return CollapseConfig.from_dict(data, source)
        return CollapseConfig.from_dict({k: v for k, v in data.items() if k not in LEGACY_FIELDS}, source)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Write the config to ``save_directory/layercollapse_config.json`` atomically and return the path."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(handle.name, path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any) -> CollapseConfig:
        """Load a config saved by :meth:`save_pretrained` (a directory or the JSON file itself)."""
        path = Path(path) / subfolder if subfolder else Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No LayerCollapse config at {path} (expected a {CONFIG_NAME} file).")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LayerCollapseConfigError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data, source=str(path))
