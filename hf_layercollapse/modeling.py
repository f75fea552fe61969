"""Collapsed and injected checkpoints that load with plain ``AutoModelForX.from_pretrained``.

How it works (transformers' own extension mechanism, no ``trust_remote_code``): a model that has been
injected or collapsed gets a config class derived from its own (``LayerCollapseBertConfig(BertConfig)``)
that serialises ``model_type: "hf_layercollapse"``, the base ``base_model_type`` and the plan (see
:mod:`hf_layercollapse.plan`). ``import hf_layercollapse`` registers that model type with ``AutoConfig``;
when a checkpoint is read, the base config class is rebuilt and a model class derived from the base one
(``LayerCollapseBertForSequenceClassification``) is registered with every ``AutoModelFor...`` mapping that
knows the base. Its ``__init__`` builds the base structure, then replaces the collapsed blocks by their
merged projections (on the meta device during ``from_pretrained``, so the uncollapsed weights are never
allocated) and re-injects the collapsible activations, before the weights are read.

Without the library installed, ``transformers`` does not know the model type ``hf_layercollapse`` and
refuses to load the checkpoint: it never loads the original architecture with random MLP weights.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto import modeling_auto
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .activation import CollapsibleActivation
from .architectures import BlockKind, Layout, projection_shape
from .plan import PLAN_FORMAT, PLAN_KEY, set_module

MODEL_TYPE = "hf_layercollapse"
INSTALL_HINT = "pip install hf-layercollapse"


class LayerCollapseConfigError(ValueError):
    """A checkpoint's collapse plan is missing, corrupt or does not fit the architecture."""


def _to_dict(self) -> dict[str, Any]:
    output = super(type(self), self).to_dict()
    output["base_model_type"] = output["model_type"]
    output["model_type"] = MODEL_TYPE
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
        base_type = config_dict.pop("base_model_type", None)
        plan = config_dict.get(PLAN_KEY)
        if base_type is None or not isinstance(plan, dict) or not isinstance(plan.get("blocks"), dict):
            raise LayerCollapseConfigError(
                f"This {MODEL_TYPE} config lacks 'base_model_type' or a valid '{PLAN_KEY}' plan: the checkpoint's "
                "config.json is corrupt or was not written by hf_layercollapse."
            )
        if plan.get("format", 0) > PLAN_FORMAT:
            raise LayerCollapseConfigError(
                f"The checkpoint's collapse plan has format {plan['format']}, newer than this hf_layercollapse "
                f"understands ({PLAN_FORMAT}); upgrade with `pip install -U hf-layercollapse`."
            )
        try:
            base_cls = CONFIG_MAPPING[base_type]
        except KeyError:
            raise LayerCollapseConfigError(
                f"The checkpoint's base model type {base_type!r} is unknown to this version of transformers."
            ) from None
        config_dict["model_type"] = base_type
        dyn = collapsed_config_class(base_cls)
        register_auto_classes(dyn)
        return dyn.from_dict(config_dict, **kwargs)


def apply_plan(model: nn.Module, plan: dict[str, Any]) -> None:
    """Rebuild the plan's structure on a freshly built base model: merged projections (uninitialised: the
    checkpoint fills them) for collapsed blocks, collapsible activations for injected ones."""
    base = getattr(model, "base_model", model)
    for name, entry in plan["blocks"].items():
        layout = Layout.from_dict(entry["layout"])
        try:
            owner = base.get_submodule(name) if name else base
            fc1, fc2 = owner.get_submodule(layout.fc1), owner.get_submodule(layout.fc2)
            act = owner.get_submodule(layout.act)
        except AttributeError as err:
            raise LayerCollapseConfigError(
                f"The collapse plan names block {name!r} ({layout.fc1}, {layout.act}, {layout.fc2}) but "
                f"{type(model).__name__} has no such module: {err}. The checkpoint does not match this architecture."
            ) from None
        if entry["state"] == "injected":
            constant = line = affine = None
            like = {"dtype": fc1.weight.dtype, "device": fc1.weight.device}
            if entry.get("affine"):  # an affine target (linear_target="affine"): filled from the checkpoint
                d_in, d_out = projection_shape(fc1)[0], projection_shape(fc2)[1]
                affine = (torch.zeros(d_out, d_in, **like), torch.zeros(d_out, **like))
            elif layout.kind is BlockKind.GATED:  # filled from the checkpoint, like α
                channels = projection_shape(fc1)[1] // (2 if layout.gate == layout.fc1 else 1)
                constant = torch.zeros(channels, **like)
            if entry.get("line"):  # a fitted target (linear_target="fitted"): filled from the checkpoint
                line = (torch.zeros(projection_shape(fc1)[1], **like),) * 2
            wrapped = CollapsibleActivation(act, entry.get("mode", "blend"), 0.0, gate_constant=constant, line=line,
                                            affine=affine)
            wrapped.layout = layout
            wrapped.fitted_gate = bool(entry.get("fitted_gate"))
            set_module(owner, layout.act, wrapped)
            if affine is not None:
                wrapped.attach(fc1, fc2, owner.get_submodule(layout.gate) if layout.gate is not None else None)
            continue
        _install_empty_merged(model, name, owner, layout, fc1, fc2, entry)


def _install_empty_merged(model, name, owner, layout, fc1, fc2, entry) -> None:
    from .collapse import empty_projection, install_merged

    d_in, d_out = projection_shape(fc1)[0], projection_shape(fc2)[1]
    if (entry.get("in_features"), entry.get("out_features")) != (d_in, d_out):
        raise LayerCollapseConfigError(
            f"The collapse plan says block {name!r} maps {entry.get('in_features')} -> {entry.get('out_features')} "
            f"features, but {type(model).__name__} has {d_in} -> {d_out} there: the plan and the architecture disagree."
        )
    install_merged(owner, layout, empty_projection(fc2, d_in, d_out, bool(entry.get("bias", True))))


def _plan_module_names(model: nn.Module) -> list[str]:
    plan = getattr(model.config, PLAN_KEY)
    prefix = next((n for n, m in model.named_modules() if m is model.base_model and n), "")
    names = []
    for name, entry in plan["blocks"].items():
        layout = Layout.from_dict(entry["layout"])
        part = layout.act if entry["state"] == "injected" else layout.fc2
        names.append(".".join(p for p in (prefix, name, part) if p))
    return names


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
        apply_plan(self, getattr(config, PLAN_KEY))

    @classmethod
    def is_custom_code(cls) -> bool:
        # The derived class runs its base class's code. transformers applies a class's checkpoint key conversions
        # (ViTModel, DeiTModel, CLIP*Model, GPTNeoXForCausalLM...) only to non-custom classes: without this, a
        # checkpoint saved from a head model (legacy key names) would not load into AutoModel, and back.
        base = next(b for b in cls.__mro__ if not issubclass(b, _CollapsedModelMixin))
        return base.is_custom_code()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as err:  # its message names no file: say which one is unreadable
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
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
            plan_names = _plan_module_names(loaded)
            in_blocks = [k for k in mismatched if any(k == n or k.startswith(n + ".") for n in plan_names)]
            if not in_blocks:
                raise  # outside the blocks (a new head's num_labels): transformers' own advice fits
            raise LayerCollapseConfigError(
                f"The checkpoint's weights {in_blocks[:6]} do not have the shapes that its architecture and "
                "collapse plan expect: it is corrupt or belongs to another model; nothing was loaded."
            ) from err
        wrong = [k for k in list(info.get("missing_keys", [])) + [m[0] if isinstance(m, tuple) else m
                 for m in info.get("mismatched_keys", [])]
                 if any(k.startswith(n + ".") or k == n for n in _plan_module_names(model))]
        if wrong:
            raise LayerCollapseConfigError(
                f"The checkpoint lacks or has wrongly shaped weights for its collapsed/injected blocks: {wrong[:6]}. "
                "It is incomplete or does not belong to this collapse plan; nothing was loaded."
            )
        return (model, info) if want_info else model


@functools.cache
def collapsed_model_class(base_cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The model class, derived from ``base_cls``, that rebuilds a collapse plan when it is constructed."""
    if issubclass(base_cls, _CollapsedModelMixin):
        return base_cls
    # Same name as the base class: transformers matches class names (causal-LM label shifting in Trainer,
    # pipelines' supported-model checks, config.architectures).
    return type(base_cls.__name__, (_CollapsedModelMixin, base_cls), {
        "__module__": __name__, "__qualname__": base_cls.__qualname__,
        "config_class": collapsed_config_class(base_cls.config_class),
        "__doc__": f"{base_cls.__name__} with LayerCollapse blocks, rebuilt from the config's collapse plan.",
    })


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
        if any(mapping is m for m in model_mappings):  # a model class: its derived class rebuilds the plan
            if not (isinstance(value, type) and issubclass(value, PreTrainedModel)):
                continue
            value = collapsed_model_class(value)
        mapping.register(config_cls, value, exist_ok=True)


def mark_model(model: PreTrainedModel) -> None:
    """Give an injected or collapsed model the derived config and model classes, so that ``save_pretrained``
    writes a checkpoint that only loads with hf_layercollapse (and then loads exactly)."""
    config_cls = collapsed_config_class(type(model.config))
    if type(model.config) is not config_cls:
        model.config.__class__ = config_cls
        register_auto_classes(config_cls)
    model_cls = type(model)
    if not issubclass(model_cls, _CollapsedModelMixin):
        model.__class__ = collapsed_model_class(model_cls)


AutoConfig.register(MODEL_TYPE, LayerCollapseCheckpointConfig, exist_ok=True)
