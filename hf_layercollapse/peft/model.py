"""`LayerCollapseModel`: the PEFT tuner of LayerCollapse, and its merge (LoRA merged first, blocks collapsed then)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from peft import PeftModel, inject_adapter_in_model
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from peft.tuners.tuners_utils import set_adapter as _set_layers_adapter
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from ..activation import CollapsibleActivation, injected_activations
from ..calibration import fit_targets
from ..checkpoint import record_unit
from ..collapse import collapse_model
from ..config import CollapseConfig
from ..inject import check_not_shared, selected_units
from ..modules import join, set_module
from ..record import UnitRecord
from ..report import CollapseReport
from ..targets import LinearTarget, target_for
from ..units import Unit
from .config import LayerCollapseConfig
from .layer import PEFT_PREFIX, LayerCollapseLayer

logger = logging.getLogger(__name__)


def _select_targets(model: nn.Module, config: LayerCollapseConfig) -> tuple[dict[str, Unit], set[str]]:
    """``{activation name: unit}`` of the units ``config`` selects, and the activation names it excludes."""
    try:
        units, excluded = selected_units(model, config)
    except ValueError as err:
        if "No MLP block" not in str(err):
            raise
        raise ValueError(f"{err} Add the LayerCollapse adapter before other adapters (LoRA layers hide the projections "
                         "from the block finder).") from None
    activation = lambda u: join(u.name, u.layout.act)  # noqa: E731
    for unit in units:
        target_for(unit.layout, config.linear_target, config.activation, config.affine_rank)  # refuses what it cannot
    fresh = [u for u in units if not isinstance(model.get_submodule(activation(u)), LayerCollapseLayer)]
    plain = [u.name for u in fresh if isinstance(model.get_submodule(activation(u)), CollapsibleActivation)]
    if plain:
        raise ValueError(
            f"Blocks {plain} already have collapsible activations from get_collapse_model: use either "
            "get_collapse_model (full fine-tuning) or the PEFT adapter (get_peft_model / get_lora_collapse_model) on "
            "the original model, not both."
        )
    check_not_shared(model, fresh)
    return {activation(u): u for u in units}, {activation(u) for u in excluded}


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """Every PEFT adapter layer of ``model``: LayerCollapse, LoRA and the ``modules_to_save`` wrappers."""
    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


def switch_adapters_off(model: nn.Module) -> Callable[[], None]:
    """Switch every PEFT adapter layer of ``model`` off and return the function that restores each layer's state.

    Only the layers' flag is set: PEFT's ``disable_adapter()`` / ``enable_adapters()`` would also change which
    parameters are trainable."""
    layers = adapter_layers(model)
    flags = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True

    def restore() -> None:
        for layer, flag in zip(layers, flags):
            layer._disable_adapters = flag

    return restore


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every PEFT adapter layer off within the block (:func:`switch_adapters_off`)."""
    restore = switch_adapters_off(model)
    try:
        yield model
    finally:
        restore()


def base_model_targets(model: nn.Module, targets: dict[Unit, LinearTarget],
                       calibration_data=None) -> dict[str, dict[str, torch.Tensor]]:
    """The targets' tensors fitted on the base model (every adapter layer, LayerCollapse and LoRA, switched off) over
    ``calibration_data`` (default: a dummy batch), keyed by unit name, as
    :func:`~hf_layercollapse.get_collapse_model` fits them."""
    with adapters_off(model):
        return fit_targets(model, targets, calibration_data)


class LayerCollapseModel(BaseTuner):
    """The PEFT tuner of LayerCollapse (what ``peft.get_peft_model`` builds for a
    :class:`~hf_layercollapse.LayerCollapseConfig`); usually reached through the ``PeftModel``.

    Targets are found by hf_layercollapse's block finder (``target_modules``, ``exclude_modules`` and
    ``layers_to_transform`` select MLP *blocks*, see :class:`~hf_layercollapse.LayerCollapseConfig`), not by
    PEFT's per-model tables. When the config has a ``lora_config``, its LoRA layers are injected into the same
    adapter after the activations are wrapped.

    ``merge_and_unload()`` merges LoRA, then collapses the blocks within ``threshold`` and returns the plain model;
    the :class:`~hf_layercollapse.CollapseReport` is kept in ``collapse_report``.

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertModel
        >>> import hf_layercollapse as hlc
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64)).eval()
        >>> peft_model = get_peft_model(model, hlc.LayerCollapseConfig(layers_to_transform=-1))
        >>> type(peft_model.base_model).__name__, peft_model.get_nb_trainable_parameters()[0]
        ('LayerCollapseModel', 1)
        >>> _ = peft_model.base_model.model.encoder.layer[1].intermediate.intermediate_act_fn.alpha.data.fill_(1.0)
        >>> merged = peft_model.merge_and_unload()
        >>> report = peft_model.base_model.collapse_report
        >>> type(merged.encoder.layer[1].intermediate.dense).__name__, [row.name for row in report.collapsed]
        ('Identity', ['encoder.layer.1'])
    """

    prefix: str = PEFT_PREFIX
    # LayerCollapse layers and the LoRA layers of `lora_config` belong to the same adapter: set_adapter, freezing and
    # deletion must reach both kinds.
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    def _prepare_adapter_config(self, peft_config: LayerCollapseConfig, model_config: dict) -> LayerCollapseConfig:
        return peft_config  # blocks are found by structure, no per-model_type table of names is needed

    def _prepare_model(self, peft_config: LayerCollapseConfig, model: nn.Module) -> None:
        if peft_config.linear_target == "affine" and peft_config.affine_rank is None:
            raise ValueError("linear_target='affine' with the full d×d map per block is not offered through PEFT: set "
                             "affine_rank= (e.g. 16: the fitted map stays frozen in the adapter and a rank-16 "
                             "correction trains), or use hf_layercollapse.get_collapse_model(model, config, "
                             "calibration_data=...) for the full map.")
        self._targets, self._excluded = _select_targets(model, peft_config)
        # the targets start as get_collapse_model's do on a dummy batch (the mean gate; fitted lines);
        # calibrate_linear_targets fits them on calibration data, PeftModel.from_pretrained reads them
        targets = {u: target_for(u.layout, peft_config.linear_target, peft_config.activation,
                                 peft_config.affine_rank) for u in self._targets.values()}
        self._initial_targets = base_model_targets(model, targets)

    def _check_target_module_exists(self, peft_config: LayerCollapseConfig, key: str) -> bool | _ExcludedModule:
        if key in self._excluded:
            return _ExcludedModule()
        return key in self._targets

    def _create_and_replace(
        self,
        peft_config: LayerCollapseConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        unit = self._targets[current_key]
        weight = unit.owner(self.model).get_submodule(unit.layout.output).weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else None}
        tensors = self._initial_targets.get(unit.name)
        if isinstance(target, LayerCollapseLayer):
            target.update_layer(adapter_name, peft_config, tensors, **factory)
            return
        layer = LayerCollapseLayer(target, adapter_name, unit.layout, peft_config, tensors, **factory)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # an additional adapter is not trainable until it is activated
        self._replace_module(parent, target_name, layer, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, LayerCollapseLayer) or isinstance(child, LayerCollapseLayer):
            # activations have no weight to take the device from (PEFT's version would look for one)
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        target_modules = config.target_modules  # PEFT may shorten long name lists: keep the user's selectors
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        finally:
            config.target_modules = target_modules
        lora = config.get_lora_config()
        if lora is not None:
            self._inject_lora(model, adapter_name, lora, low_cpu_mem_usage)
        for owner, layer in injected_activations(model).items():  # after LoRA: the blend sees LoRA's projections
            if isinstance(layer, LayerCollapseLayer):  # (again for a new adapter: its LoRA may wrap them now)
                layer.detach_hooks()
                layer.attach_hooks(model.get_submodule(owner))

    def _inject_lora(self, model: nn.Module, adapter_name: str, lora: LoraConfig, low_cpu_mem_usage: bool) -> None:
        """Add the LoRA layers of the adapter (after the activations are wrapped: the block finder needs the plain
        projections). PEFT's LoRA tuner injects them; the model keeps this tuner's ``peft_config``."""
        # LoRA must not reach into modules trained in full (PEFT excludes modules_to_save from LoRA's targets)
        lora.modules_to_save = list(self.peft_config[adapter_name].modules_to_save or []) or None
        own = model.__dict__.pop("peft_config", None)
        try:
            inject_adapter_in_model(lora, model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        finally:
            model.__dict__.pop("peft_config", None)
            if own is not None:
                model.peft_config = own
        self.targeted_module_names.extend(
            n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A
            and n not in self.targeted_module_names
        )
        # LoRA's injection made `adapter_name` the active LoRA adapter: restore this tuner's active adapters.
        active = self.peft_config[self.active_adapters[0]] if self.active_adapters else None
        _set_layers_adapter(model, self.active_adapters, inference_mode=bool(active and active.inference_mode),
                            layer_cls=LoraLayer)

    # ------------------------------------------------------------------------------------------ merge / unload
    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if not merge:  # unload: original activations, LoRA removed
            for layer in [m for m in self.model.modules() if isinstance(m, LayerCollapseLayer)]:
                layer.detach_hooks()
            return super()._unload_and_optionally_merge(False, progressbar, safe_merge, adapter_names)
        model, self.collapse_report = self.merge_and_collapse(
            adapter_names=adapter_names, progressbar=progressbar, safe_merge=safe_merge
        )
        return model

    def merge_and_collapse(
        self,
        adapter_names: list[str] | None = None,
        threshold: float | None = None,
        blocks: list[str] | None = None,
        force: bool = False,
        progressbar: bool = False,
        safe_merge: bool = False,
    ) -> tuple[nn.Module, CollapseReport]:
        """Merge LoRA, replace the LayerCollapse layers by plain collapsible activations with the trained α and
        targets, then :func:`~hf_layercollapse.collapse_model` (``threshold``, ``blocks``, ``force`` are its
        arguments; the default threshold is the adapter's). Returns the unwrapped model and the report."""
        adapter = self._merge_adapter_name(adapter_names)
        config = self.peft_config[adapter]
        injected = []
        for name, layer in [(n, m) for n, m in self.model.named_modules() if isinstance(m, LayerCollapseLayer)]:
            layer.detach_hooks()
            if adapter not in layer.layercollapse_alpha:
                set_module(self.model, name, layer.base_layer)
                continue
            target = layer.layercollapse_target[adapter]
            host = CollapsibleActivation(layer.base_layer, target, 0.0, layer.target_tensors(adapter), layer.layout)
            alpha = layer.layercollapse_alpha[adapter]
            owner = name[: -len(layer.layout.act) - 1] if name != layer.layout.act else ""
            weight = self.model.get_submodule(join(owner, layer.layout.output)).weight
            host.to(device=alpha.device, dtype=weight.dtype if weight.is_floating_point() else alpha.dtype)
            with torch.no_grad():
                host.alpha.copy_(alpha.detach())
            set_module(self.model, name, host)
            injected.append((owner, host))
        lora_adapters = adapter_names if adapter_names is not None else [adapter]
        model = super()._unload_and_optionally_merge(True, progressbar, safe_merge, lora_adapters)
        for owner, host in injected:  # the projections are plain again: hook them for the target
            host.target.attach(host, model.get_submodule(owner), host.layout)
            record_unit(model, owner, UnitRecord("injected", host.layout, target=host.target), config)
        report = collapse_model(model, blocks=blocks, threshold=config.threshold if threshold is None else threshold,
                                force=force)
        logger.info("LayerCollapse merge_and_unload:\n%s", report)
        return model, report

    def _merge_adapter_name(self, adapter_names: list[str] | None) -> str:
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapters {unknown} do not exist; this model has {list(self.peft_config)}.")
        if len(names) != 1:
            raise ValueError(
                f"merge_and_unload collapses with one LayerCollapse adapter, got {names}: pass adapter_names=[name]."
            )
        return names[0]


def peft_collapse_config(model: nn.Module) -> CollapseConfig | None:
    """The active :class:`~hf_layercollapse.LayerCollapseConfig` of a PEFT model, or ``None``."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    active = getattr(model, "active_adapters", None)
    names = active if isinstance(active, list) else list(configs)
    found = [configs[n] for n in names if isinstance(configs.get(n), LayerCollapseConfig)]
    return found[0] if found else None


def peft_trainer_settings(model: nn.Module) -> CollapseConfig | None:
    """The LayerCollapse settings of a PEFT model for the trainer, ``None`` for a model without PEFT. Refuses a PEFT
    model whose α PEFT neither trains nor saves (another method's ``PeftModel`` around a model prepared by
    ``get_collapse_model``)."""
    if not isinstance(model, PeftModel):
        return None
    config = peft_collapse_config(model)
    if config is None and injected_activations(model):
        raise ValueError(
            f"This {model.peft_type} PeftModel wraps a model with collapsible activations, but PEFT froze their α and "
            "would not save it: build the model with hf_layercollapse.get_lora_collapse_model(model, lora_config, "
            "collapse_config) on the original model, so that LoRA and α train and save together."
        )
    dummy = [name for name, layer in injected_activations(model).items() if isinstance(layer, LayerCollapseLayer)
             and layer._adapter() not in layer.layercollapse_calibrated
             and len(layer.target.trainable_names) < len(layer.target.tensor_names)]
    if dummy:
        logger.warning("The fitted lines (or affine maps) of %s were fitted on get_peft_model's dummy batch only: call "
                       "hf_layercollapse.calibrate_linear_targets(peft_model, calibration_data) before training (or "
                       "pass calibration_data to get_lora_collapse_model).", dummy)
    return config
