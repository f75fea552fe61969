"""Checkpoints of models with injected or collapsed units that load with plain ``AutoModelForX.from_pretrained``.

How it works (transformers' own extension mechanism, no ``trust_remote_code``): a model whose units were injected or
collapsed gets a config class derived from its own (``LayerCollapseBertConfig(BertConfig)``) that serialises
``model_type: "hf_layercollapse"``, the base ``base_model_type`` and the collapse record (:mod:`hf_layercollapse.
record`). ``import hf_layercollapse`` registers that model type with ``AutoConfig``; when a checkpoint is read, the
base config class is rebuilt and a model class derived from the base one (named like its base,
``BertForSequenceClassification``) is registered with every ``AutoModelFor...`` mapping that knows the base. Its
``__init__`` builds the base structure, then replaces the collapsed units by their merged projections (on the meta
device during ``from_pretrained``, so the uncollapsed weights are never allocated) and re-injects the collapsible
activations, before the weights are read.

Without the library installed, ``transformers`` does not know the model type ``hf_layercollapse`` and refuses to load
the checkpoint: it never loads the original architecture with random MLP weights.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto import modeling_auto
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .activation import inject_unit
from .config import CollapseConfig
from .errors import LayerCollapseConfigError
from .modules import base_prefix, empty_projection, join
from .record import RECORD_KEY, CollapseRecord, UnitRecord, hub_model_id
from .saving import atomic_folder, clean_stale, verify_manifest
from .units import Unit, find_mlp_blocks
from .version import __version__

MODEL_TYPE = "hf_layercollapse"
INSTALL_HINT = "pip install hf-layercollapse"


# ---------------------------------------------------------------------------------------------------- configs
#: Written into every checkpoint's config.json, for whoever opens it without the library installed (transformers then
#: only says that it does not know the model type).
REQUIRES_NOTE = (f"This checkpoint has LayerCollapse blocks: `{INSTALL_HINT}`, then `import hf_layercollapse` before "
                 "AutoModel...from_pretrained (no trust_remote_code needed).")


def _to_dict(self) -> dict[str, Any]:
    output = super(type(self), self).to_dict()
    output["base_model_type"] = output["model_type"]
    output["model_type"] = MODEL_TYPE
    output["layercollapse_requires"] = REQUIRES_NOTE
    return output


def _new_config(base_cls: type) -> PretrainedConfig:
    cls = collapsed_config_class(base_cls)
    return cls.__new__(cls)


def _reduce(self):
    # pickle/deepcopy: the derived class is rebuilt from its base; every attribute (including private ones such
    # as _attn_implementation, which to_dict leaves out) is restored as it was.
    return _new_config, (type(self).__mro__[1],), dict(self.__dict__)


@functools.cache
def collapsed_config_class(base_cls: type[PretrainedConfig]) -> type[PretrainedConfig]:
    """The config class of injected/collapsed models of ``base_cls``: same fields and ``model_type`` in memory,
    serialised as ``model_type: "hf_layercollapse"`` with ``base_model_type``."""
    if getattr(base_cls, "_is_layercollapse", False):
        return base_cls
    return type(f"LayerCollapse{base_cls.__name__}", (base_cls,), {
        "__module__": __name__, "_is_layercollapse": True, "to_dict": _to_dict, "__reduce__": _reduce,
        "__doc__": f"{base_cls.__name__} of a model with LayerCollapse blocks (saved as model_type "
                   f"{MODEL_TYPE!r}).",
    })


class LayerCollapseCheckpointConfig(PretrainedConfig):
    """Entry point registered with ``AutoConfig`` for ``model_type: "hf_layercollapse"``: rebuilds the base
    model's config class (see the module docstring). Not meant to be instantiated directly."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
        config_dict = dict(config_dict)
        config_dict.pop("layercollapse_requires", None)
        base_type = config_dict.pop("base_model_type", None)
        if base_type is None:
            raise LayerCollapseConfigError(
                f"This {MODEL_TYPE} config lacks 'base_model_type': the checkpoint's config.json is corrupt or was not "
                "written by hf_layercollapse.")
        CollapseRecord.from_dict(config_dict.get(RECORD_KEY))  # validated before any model is built
        try:
            base_cls = CONFIG_MAPPING[base_type]
        except KeyError:
            raise LayerCollapseConfigError(
                f"The checkpoint's base model type {base_type!r} is unknown to this version of transformers."
            ) from None
        config_dict["model_type"] = base_type
        derived = collapsed_config_class(base_cls)
        register_auto_classes(derived)
        return derived.from_dict(config_dict, **kwargs)


# ---------------------------------------------------------------------------------------------------- structure
def apply_record(model: nn.Module, record: CollapseRecord) -> None:
    """Rebuild the record's structure on a freshly built base model: merged projections (uninitialised: the
    checkpoint fills them) for collapsed units, collapsible activations (placeholder tensors: filled likewise) for
    injected ones."""
    base = getattr(model, "base_model", model)
    for name, entry in record.units.items():
        unit = Unit(name, 0, entry.layout)
        try:
            owner = unit.owner(base)
            entry.layout.check(owner)
        except (AttributeError, ValueError) as err:
            raise LayerCollapseConfigError(
                f"The collapse record names block {name!r} ({', '.join(entry.layout.parts)}) but "
                f"{type(model).__name__} has no such block there: {err}. The checkpoint does not match this "
                "architecture.") from None
        if entry.state == "injected":
            inject_unit(base, unit, entry.target, entry.target.placeholders(entry.layout, owner))
            continue
        d_in, _, d_out = entry.layout.dims(owner)
        if (entry.in_features, entry.out_features) != (d_in, d_out):
            raise LayerCollapseConfigError(
                f"The collapse record says block {name!r} maps {entry.in_features} -> {entry.out_features} features, "
                f"but {type(model).__name__} has {d_in} -> {d_out} there: the record and the architecture disagree.")
        output = owner.get_submodule(entry.layout.output)
        entry.layout.install(owner, empty_projection(output, d_in, d_out, entry.bias))


def _record_module_names(model: nn.Module) -> list[str]:
    """Full names of the modules that the record's units hold weights in (injected: the host; collapsed: the merged
    projection)."""
    record = CollapseRecord.of(model)
    prefix = base_prefix(model)
    return [join(join(prefix, name), entry.layout.act if entry.state == "injected" else entry.layout.output)
            for name, entry in record.units.items()]


def _unreadable_weight_files(source: Any, subfolder: str | None) -> str:
    """The ``*.safetensors`` files of a local checkpoint that safetensors cannot open, or ``source`` itself."""
    directory = Path(str(source), subfolder or "")
    bad = []
    for path in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError):
            bad.append(str(path))
    return ", ".join(bad) if bad else f"a weights file of {source}"


class _CollapsedModelMixin:
    """Methods of the derived model classes (see :func:`collapsed_model_class`)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_record(self, CollapseRecord.of(config))

    @classmethod
    def is_custom_code(cls) -> bool:
        # The derived class runs its base class's code. transformers applies a class's checkpoint key conversions
        # (ViTModel, DeiTModel, CLIP*Model, GPTNeoXForCausalLM...) only to non-custom classes: without this, a
        # checkpoint saved from a head model (legacy key names) would not load into AutoModel, and back.
        return cls.base_class().is_custom_code()

    @classmethod
    def base_class(cls) -> type[PreTrainedModel]:
        """The transformers class this class derives from."""
        return next(b for b in cls.__mro__ if not issubclass(b, _CollapsedModelMixin))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, atomic at the level of the folder and with a manifest of the files
        (:mod:`hf_layercollapse.saving`): a save killed half-way leaves the previous checkpoint as it was, and no
        weight file of an earlier save survives beside the new ones."""
        if not kwargs.get("is_main_process", True) or kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, *args, **kwargs)
        with atomic_folder(save_directory) as folder:
            result = super().save_pretrained(folder, *args, **kwargs)
        return result

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        local = Path(str(source), kwargs.get("subfolder") or "") if source is not None else None
        if local is not None and local.is_dir():
            clean_stale(local)
            verify_manifest(local)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as err:  # its message names no file: say which one is unreadable
            raise OSError(
                f"Cannot load the weights of {source}: {_unreadable_weight_files(source, kwargs.get('subfolder'))} "
                f"is not a valid safetensors file ({err}). It is truncated or corrupt: download or save it again."
            ) from err
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err) or kwargs.get("ignore_mismatched_sizes"):
                raise
            # transformers only logs which weights have the wrong shape: load again to name them
            loaded, info = super().from_pretrained(*args, output_loading_info=True,
                                                   **{**kwargs, "ignore_mismatched_sizes": True})
            mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])]
            names = [*_record_module_names(loaded), *_mlp_part_names(loaded)]
            in_units = [k for k in mismatched if _inside(k, names)]
            if not in_units:
                raise  # outside the units (a new head's num_labels): transformers' own advice fits
            raise LayerCollapseConfigError(
                f"The checkpoint's weights {in_units[:6]} do not have the shapes that its architecture and "
                "collapse record expect: it is corrupt or belongs to another model; nothing was loaded."
            ) from err
        names = _record_module_names(model)
        absent = list(info.get("missing_keys", [])) + [m[0] if isinstance(m, tuple) else m
                                                       for m in info.get("mismatched_keys", [])]
        wrong = [k for k in absent if _inside(k, names)]
        if wrong:
            raise LayerCollapseConfigError(
                f"The checkpoint lacks or has wrongly shaped weights for its collapsed/injected blocks: {wrong[:6]}. "
                "It is incomplete or does not belong to this collapse record; nothing was loaded."
            )
        extra = [k for k in info.get("unexpected_keys", []) if _inside(k, names)]
        if extra:  # e.g. a bias the record says the merged projection does not have: it would be dropped
            raise LayerCollapseConfigError(
                f"The checkpoint holds weights {extra[:6]} that its collapse record has no place for (the record was "
                "edited, or belongs to another save); nothing was loaded. Save or download the checkpoint again."
            )
        wrong = [k for k in absent if _inside(k, _mlp_part_names(model))] if absent else []
        if wrong:  # an MLP block merged in the weights but missing from the record (an edited config.json)
            raise LayerCollapseConfigError(
                f"The checkpoint lacks or has wrongly shaped weights for MLP blocks its collapse record does not "
                f"name: {wrong[:6]}. Its config.json does not describe its weights (edited, or from another save); "
                "nothing was loaded, and ignore_mismatched_sizes=True cannot fix it. Save or download it again."
            )
        return (model, info) if want_info else model


def _inside(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def _mlp_part_names(model: PreTrainedModel) -> list[str]:
    """Full names of the projections of every MLP block of ``model`` (none when its blocks cannot be found)."""
    try:
        units = find_mlp_blocks(model)
    except (ValueError, RuntimeError, TypeError):
        return []
    return [join(unit.name, part) for unit in units for part in unit.layout.parts]


@functools.cache
def collapsed_model_class(base_cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The model class, derived from ``base_cls``, that rebuilds a collapse record when it is constructed."""
    if issubclass(base_cls, _CollapsedModelMixin):
        return base_cls
    # Same name as the base class: transformers matches class names (causal-LM label shifting in Trainer,
    # pipelines' supported-model checks, config.architectures).
    return type(base_cls.__name__, (_CollapsedModelMixin, base_cls), {
        "__module__": __name__, "__qualname__": base_cls.__qualname__,
        "config_class": collapsed_config_class(base_cls.config_class),
        "__doc__": f"{base_cls.__name__} with LayerCollapse blocks, rebuilt from the config's collapse record.",
    })


def original_class(model: nn.Module) -> type[nn.Module]:
    """The transformers class of ``model`` without this library's derivation."""
    cls = type(model)
    return cls.base_class() if issubclass(cls, _CollapsedModelMixin) else cls


# ---------------------------------------------------------------------------------------------------- Auto classes
def _auto_classes() -> list[type[_BaseAutoModelClass]]:
    return [obj for obj in vars(modeling_auto).values()
            if isinstance(obj, type) and issubclass(obj, _BaseAutoModelClass)
            and getattr(obj, "_model_mapping", None) is not None]


def _processor_mappings() -> list:
    """The mappings from config class to tokenizer, image processor, feature extractor and processor classes."""
    from transformers.models.auto import (
        feature_extraction_auto,
        image_processing_auto,
        processing_auto,
        tokenization_auto,
    )

    return [tokenization_auto.TOKENIZER_MAPPING, image_processing_auto.IMAGE_PROCESSOR_MAPPING,
            feature_extraction_auto.FEATURE_EXTRACTOR_MAPPING, processing_auto.PROCESSOR_MAPPING]


def register_auto_classes(config_cls: type[PretrainedConfig]) -> None:
    """Map ``config_cls`` (a :func:`collapsed_config_class`) to derived model classes in every ``AutoModelFor...``
    whose mapping knows its base config, and to the base config's tokenizer, image processor, feature extractor and
    processor classes (``AutoTokenizer`` reads a checkpoint's config when its ``tokenizer_config.json`` names no
    class, as bert-base-uncased's does not)."""
    base_cfg = config_cls.__mro__[1]
    model_mappings = [auto._model_mapping for auto in _auto_classes()]
    for mapping in _processor_mappings() + model_mappings:
        if config_cls in mapping._extra_content:
            continue
        try:
            value = mapping[base_cfg]
        except (KeyError, ImportError, AttributeError):
            continue
        if any(mapping is m for m in model_mappings):  # a model class: its derived class rebuilds the record
            value = _derived_model_value(value)
            if value is None:
                continue
        mapping.register(config_cls, value, exist_ok=True)


def _is_model_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, PreTrainedModel)


def _derived_model_value(value: Any) -> Any:
    """What a model mapping maps the derived config to: the derived class of ``value``, or for a tuple of classes
    (FunnelModel/FunnelBaseModel, DeiT's two image classifiers) the tuple of their derived classes, which keep their
    base's names (``_get_model_class`` picks the one that ``config.architectures`` names). None: nothing to map."""
    if _is_model_class(value):
        return collapsed_model_class(value)
    if isinstance(value, (list, tuple)) and value and all(_is_model_class(v) for v in value):
        return tuple(collapsed_model_class(v) for v in value)
    return None


def mark_model(model: PreTrainedModel) -> None:
    """Give an injected or collapsed model the derived config and model classes, so that ``save_pretrained``
    writes a checkpoint that only loads with hf_layercollapse (and then loads exactly)."""
    config_cls = collapsed_config_class(type(model.config))
    if type(model.config) is not config_cls:
        # a copy of the derived class: the user's config object (from_config(config) shares it) keeps its class
        original, derived = model.config, copy.deepcopy(model.config)
        derived.__class__ = config_cls
        for module in model.modules():
            if getattr(module, "config", None) is original:
                module.config = derived
        register_auto_classes(config_cls)
    if not issubclass(type(model), _CollapsedModelMixin):
        model.__class__ = collapsed_model_class(type(model))


# ---------------------------------------------------------------------------------------------------- recording
def to_base_name(model: nn.Module, name: str) -> str:
    """``name`` (relative to ``model``) relative to its base model, as records keep it."""
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


def record_unit(model: nn.Module, name: str, entry: UnitRecord, config: CollapseConfig | None = None) -> None:
    """Record unit ``name`` (relative to ``model``) in the model's collapse record (and the settings of ``config``),
    and mark the model so that it saves as a LayerCollapse checkpoint. Models without a ``transformers`` config
    (plain ``nn.Module``) keep no record."""
    if not isinstance(model, PreTrainedModel):
        return
    record = CollapseRecord.of(model) or CollapseRecord(
        base_model_type=model.config.model_type, base_architecture=original_class(model).__name__,
        # a local directory is not recorded: it means nothing elsewhere, and a checkpoint on the Hub would show it
        base_model_name_or_path=hub_model_id(getattr(model, "name_or_path", None)))
    record.units[to_base_name(model, name)] = entry
    record.library_version = __version__
    if config is not None:
        record.config = CollapseConfig.from_settings(config.settings())
    record.write(model)
    mark_model(model)


AutoConfig.register(MODEL_TYPE, LayerCollapseCheckpointConfig, exist_ok=True)
