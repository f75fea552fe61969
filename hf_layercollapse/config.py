"""`LayerCollapseConfig`: which MLP blocks to make collapsible, and how."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "layercollapse_config.json"
ACTIVATIONS = ("blend", "prelu")
DEFAULT_INIT_ALPHA = {"blend": 0.0, "prelu": 0.01}


@dataclass
class LayerCollapseConfig:
    """Configuration of LayerCollapse, in the style of a PEFT config.

    Args:
        target_modules: Blocks to make collapsible. ``None`` selects every detected MLP block. A list of names
            selects a block when its own name or the name of one of its modules (input projection, activation,
            output projection) equals an entry or ends with ``"." + entry``; a string is a regular expression
            that must fully match one of those names (PEFT's matching rules).
        exclude_modules: Blocks to leave alone, with the same matching rules as ``target_modules``.
        layers_to_transform: Block indices to transform (an int or a list), counted over the detected MLP
            blocks in model order; negative indices count from the end, so ``[-4, -3, -2, -1]`` is the
            paper's "last 4 blocks".
        activation: ``"blend"`` (``α·x + (1−α)·act(x)``; exactly the original model at α = 0) or ``"prelu"``
            (the paper's PReLU with slope α, which replaces the original activation).
        init_alpha: Initial α. ``None`` means 0.0 for ``"blend"`` and 0.01 for ``"prelu"``.
        reg_weight: λ, the weight of the regulariser ``λ·Σ(1−α)²`` added to the task loss during training.
        threshold: τ: a block is collapsed when ``|1 − α| ≤ τ``.

    Example:
        >>> from hf_layercollapse import LayerCollapseConfig
        >>> config = LayerCollapseConfig(layers_to_transform=[-2, -1], reg_weight=0.5)
        >>> config.init_alpha
        0.0
        >>> LayerCollapseConfig.from_dict(config.to_dict()) == config
        True
    """

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

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not supported: use one of {ACTIVATIONS}.")
        if self.init_alpha is None:
            self.init_alpha = DEFAULT_INIT_ALPHA[self.activation]
        if not 0.0 <= float(self.init_alpha) <= 1.0:
            raise ValueError(f"init_alpha={self.init_alpha!r} must lie in [0, 1] (1 means linear).")
        if not float(self.reg_weight) >= 0.0:
            raise ValueError(f"reg_weight={self.reg_weight!r} must be >= 0 (it is the weight λ of Σ(1−α)²).")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} must lie in [0, 1] (a block collapses when |1−α| ≤ τ).")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"{name}={value!r} is not a valid regular expression: {err}") from err
            elif value is not None:
                if isinstance(value, (set, tuple)):
                    value = sorted(value) if isinstance(value, set) else list(value)
                    setattr(self, name, value)
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    raise ValueError(f"{name}={value!r} must be None, a regex string or a list of module names.")
        layers = self.layers_to_transform
        if isinstance(layers, (tuple, range)):
            self.layers_to_transform = layers = list(layers)
        if layers is not None and not (
            isinstance(layers, int) or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
        ):
            raise ValueError(f"layers_to_transform={layers!r} must be None, an int or a list of ints.")

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerCollapseConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown LayerCollapseConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
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
    def from_pretrained(cls, path: str | os.PathLike) -> LayerCollapseConfig:
        """Load a config saved by :meth:`save_pretrained` (a directory or the JSON file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No LayerCollapse config at {path} (expected a {CONFIG_NAME} file).")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)
