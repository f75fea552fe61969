"""`LayerCollapseConfig`: the LayerCollapse settings as a ``peft.PeftConfig`` (``peft_type="LAYERCOLLAPSE"``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftConfig
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME

from ..config import CONFIG_NAME, CollapseConfig
from ..errors import LayerCollapseConfigError

#: The ``peft_type`` of LayerCollapse adapters (a key :func:`~hf_layercollapse.peft.register_peft_method` adds to
#: PEFT's registries).
PEFT_TYPE = "LAYERCOLLAPSE"
# Fields of a LoraConfig that describe the adapter as a whole, not the LoRA layers: owned by the LayerCollapseConfig.
_LORA_BOOKKEEPING = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                     "peft_version", "auto_mapping", "runtime_config", "modules_to_save")


def _jsonable(value: Any) -> Any:
    """``value`` with sets, tuples and enums turned into JSON types (sets sorted, so the result is stable)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@dataclass
class LayerCollapseConfig(CollapseConfig, PeftConfig):
    """Configuration of LayerCollapse: which MLP blocks become collapsible and how; a ``peft.PeftConfig`` too
    (``peft_type="LAYERCOLLAPSE"``), so it works with :func:`~hf_layercollapse.get_collapse_model` and with PEFT's
    own entry points (``peft.get_peft_model``, ``PeftModel.from_pretrained``...).

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
        linear_target: What the block becomes at α = 1 (``activation="blend"``; see :mod:`hf_layercollapse.targets`).
            ``"default"``: the identity on plain blocks (the paper's linearisation, ``W2·W1``), and on gated blocks a
            learnable constant gate ``c`` that starts at the per-channel mean of ``act(gate(x))`` on the
            calibration data (on a dummy batch without). ``"fitted"`` (needs calibration data): on plain blocks the
            per-channel least-squares line ``a·z + b`` of the activation (fixed buffers; at α = 1 the block is
            ``W2·diag(a)·W1``), on gated blocks ``c`` starts at the value whose collapsed block is closest to the
            original block's output. ``"affine"`` (needs calibration data): the whole block blends towards the
            affine map of its input closest to its output on the calibration data, ``(1−α)·block(x) + α·(W·x + b)``
            with ``W`` and ``b`` learnable; the richest target, at ``d_out·d_in`` more parameters per block while
            training (through PEFT only with ``affine_rank``).
        affine_rank: With ``linear_target="affine"``: ``None`` trains the full map ``W``; an int ``r`` keeps the
            fitted map frozen and trains a rank-``r`` correction, ``(W₀ + B·A)·x + b``
            (:class:`~hf_layercollapse.targets.LowRankAffine`; ``r·(d_in + d_out) + d_out`` trainable values per
            block), also through PEFT / LoRA (then the fitted map is a buffer of the adapter: fit it with
            :func:`~hf_layercollapse.calibrate_linear_targets`).
        modules_to_save: With PEFT only: modules besides α (and LoRA) to train and save in full, e.g. a new
            classification head (PEFT adds ``classifier``/``score`` itself for ``task_type="SEQ_CLS"``).
        lora_config: With PEFT only: a ``peft.LoraConfig`` (or the dict of its fields) whose LoRA layers are part of
            the LayerCollapse adapter, so that LoRA and α train, save, load and merge together (see
            :func:`hf_layercollapse.get_lora_collapse_model`). Stored as a JSON-ready dict; its ``modules_to_save``
            and ``task_type`` move to this config.

    The fields inherited from ``PeftConfig`` (``task_type``, ``inference_mode``, ``base_model_name_or_path``...)
    are only used by PEFT; checkpoints record the LayerCollapse settings alone (:meth:`settings`).

    Example:
        >>> from hf_layercollapse import LayerCollapseConfig
        >>> config = LayerCollapseConfig(layers_to_transform=[-2, -1], reg_weight=0.5)
        >>> config.init_alpha
        0.0
        >>> LayerCollapseConfig.from_dict(config.to_dict()) == config
        True
    """

    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "PEFT only: modules trained and saved in full besides α and LoRA (e.g. a new head)."},
    )
    lora_config: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "PEFT only: a LoraConfig (or its dict) whose LoRA layers train, save and merge with α."},
    )

    def __post_init__(self) -> None:
        PeftConfig.__post_init__(self)
        CollapseConfig.__post_init__(self)
        self.peft_type = PEFT_TYPE
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save) if isinstance(self.modules_to_save, set) else list(
                self.modules_to_save)
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(v, str) and v for v in self.modules_to_save)
        ):
            raise LayerCollapseConfigError(f"modules_to_save={self.modules_to_save!r} must be None or a list of "
                                           "module names.")
        if self.lora_config is not None:
            if self.linear_target == "affine" and self.affine_rank is None:
                raise LayerCollapseConfigError(
                    "linear_target='affine' with the full d×d map per block cannot be combined with lora_config: "
                    "set affine_rank= (e.g. 16: the fitted map stays frozen and a rank-16 correction trains with "
                    "LoRA), or use get_collapse_model without LoRA for the full map.")
            self._normalise_lora_config()

    def _normalise_lora_config(self) -> None:
        value = self.lora_config
        if isinstance(value, LoraConfig):
            data = value.to_dict()
        elif isinstance(value, dict):
            data = dict(value)
        else:
            raise LayerCollapseConfigError(f"lora_config={value!r} must be None, a peft.LoraConfig or the dict of "
                                           "its fields.")
        if data.get("peft_type", "LORA") != "LORA":
            kind = _jsonable(data["peft_type"])
            raise LayerCollapseConfigError(f"lora_config has peft_type={kind!r}: only LoRA can be combined with "
                                           "LayerCollapse.")
        if self.task_type is None and data.get("task_type") is not None:
            self.task_type = _jsonable(data["task_type"])
        extra = data.get("modules_to_save") or []
        if extra:
            self.modules_to_save = list(dict.fromkeys([*(self.modules_to_save or []), *extra]))
        self.lora_config = {k: _jsonable(v) for k, v in data.items() if k not in _LORA_BOOKKEEPING}
        try:
            self.get_lora_config()
        except (TypeError, ValueError) as err:
            raise LayerCollapseConfigError(f"lora_config is not a valid peft.LoraConfig: {err}") from err

    def get_lora_config(self) -> LoraConfig | None:
        """A fresh ``peft.LoraConfig`` built from ``lora_config`` (``None`` when there is none)."""
        if self.lora_config is None:
            return None
        lora = LoraConfig.from_peft_type(peft_type="LORA", **self.lora_config)
        lora.inference_mode = self.inference_mode
        return lora

    def to_dict(self) -> dict[str, Any]:
        """The whole config (PEFT's fields too) as a JSON-serialisable dict."""
        return asdict(self)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, adapter_format: bool | None = None, **kwargs: Any
    ) -> Path:
        """Write the config to ``save_directory/layercollapse_config.json`` atomically and return the path.

        With ``adapter_format=True`` write PEFT's ``adapter_config.json`` instead (``PeftConfig.save_pretrained``).
        That is the default when PEFT calls this method from ``PeftModel.save_pretrained``, which it does with the
        ``auto_mapping_dict`` keyword.
        """
        if adapter_format is None:
            adapter_format = "auto_mapping_dict" in kwargs
        if adapter_format:
            PeftConfig.save_pretrained(self, str(save_directory), **kwargs)
            return Path(save_directory) / ADAPTER_CONFIG_NAME
        return CollapseConfig.save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> LayerCollapseConfig:
        """Load a config saved by :meth:`save_pretrained` (a directory or the JSON file itself).

        A directory (or Hub repository) holding PEFT's ``adapter_config.json`` of a LayerCollapse adapter works too;
        ``subfolder`` and ``kwargs`` (``revision``, ``token``...) are then PEFT's.
        """
        source = path
        path = Path(path) / subfolder if subfolder else Path(path)
        if path.is_dir() and not (path / CONFIG_NAME).is_file() and (path / ADAPTER_CONFIG_NAME).is_file():
            return cls._from_adapter_config(str(source), subfolder, **kwargs)
        if not path.exists() and not path.parent.exists():  # maybe a Hub repository id holding an adapter
            try:
                return cls._from_adapter_config(str(source), subfolder, **kwargs)
            except (OSError, ValueError) as err:
                raise FileNotFoundError(
                    f"No LayerCollapse config at {path} (expected a {CONFIG_NAME} or {ADAPTER_CONFIG_NAME} file)."
                ) from err
        if path.is_dir() and not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"No LayerCollapse config at {path} (expected a {CONFIG_NAME} or {ADAPTER_CONFIG_NAME} file).")
        return super().from_pretrained(path)

    @classmethod
    def _from_adapter_config(cls, source: str, subfolder: str | None, **kwargs: Any) -> LayerCollapseConfig:
        config = PeftConfig.from_pretrained(source, subfolder=subfolder, **kwargs)
        if not isinstance(config, cls):
            raise ValueError(f"{source} holds a {config.peft_type} adapter, not a LayerCollapse one ({PEFT_TYPE}).")
        return config
