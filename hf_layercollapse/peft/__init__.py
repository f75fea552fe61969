"""LayerCollapse as a PEFT method, and LoRA + LayerCollapse for models too big to fine-tune in full.

:func:`register_peft_method` (called by ``import hf_layercollapse``) adds the key ``"LAYERCOLLAPSE"`` to PEFT's three
registries (config class, tuner class, state-dict prefix). ``peft.register_peft_method`` only accepts names of PEFT's
closed ``PeftType`` enum, but ``PeftType`` is a ``str`` enum and the registries are plain dicts, so a plain string key
works everywhere PEFT looks a method up; PEFT itself is not modified. From then on a
:class:`~hf_layercollapse.LayerCollapseConfig` works with PEFT's own entry points:

* ``peft.get_peft_model(model, LayerCollapseConfig(...))``: the base model is frozen; each selected MLP block's
  activation is wrapped by a :class:`LayerCollapseLayer` holding one trainable α and one target per adapter (a gated
  block's trainable gate constant ``c``, a plain block's fitted line).
* ``PeftModel.save_pretrained`` writes ``adapter_config.json`` and the α and target weights (and LoRA, and
  ``modules_to_save``); ``PeftModel.from_pretrained`` and ``AutoPeftModelFor...from_pretrained`` rebuild them.
* ``merge_and_unload()`` returns a plain ``transformers`` model in which the blocks within the threshold are
  collapsed, exactly as :func:`~hf_layercollapse.collapse_model` does; the other blocks keep their trained α as
  injected blocks. ``unload()`` gives the original model back.

Modules: ``config`` (the PEFT config), ``layer`` (the tuner layer), ``model`` (the tuner), ``lora`` (the LoRA recipe).
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import PEFT_TYPE, LayerCollapseConfig
from .layer import PEFT_PREFIX, LayerCollapseLayer
from .lora import calibrate_linear_targets, get_lora_collapse_model, merge_lora_and_collapse
from .model import LayerCollapseModel, peft_collapse_config, peft_trainer_settings

__all__ = [
    "PEFT_PREFIX",
    "PEFT_TYPE",
    "LayerCollapseConfig",
    "LayerCollapseLayer",
    "LayerCollapseModel",
    "calibrate_linear_targets",
    "get_lora_collapse_model",
    "merge_lora_and_collapse",
    "peft_collapse_config",
    "peft_trainer_settings",
    "register_peft_method",
]


def _same(present: object, ours: object) -> bool:
    """The same entry (a class reloaded with its module counts as the same)."""
    if isinstance(ours, type) and isinstance(present, type):
        return (present.__module__, present.__qualname__) == (ours.__module__, ours.__qualname__)
    return present == ours


def register_peft_method() -> None:
    """Add LayerCollapse to PEFT's registries under ``peft_type="LAYERCOLLAPSE"`` (done on ``import
    hf_layercollapse``; calling it again is harmless). Refuses to overwrite an entry of that name that another
    package registered.

    Example:
        >>> from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        >>> import hf_layercollapse as hlc
        >>> PEFT_TYPE_TO_TUNER_MAPPING["LAYERCOLLAPSE"] is hlc.LayerCollapseModel
        True
    """
    entries = ((PEFT_TYPE_TO_CONFIG_MAPPING, LayerCollapseConfig), (PEFT_TYPE_TO_TUNER_MAPPING, LayerCollapseModel),
               (PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_PREFIX))
    for mapping, ours in entries:
        present = mapping.get(PEFT_TYPE)
        if present is not None and not _same(present, ours):
            raise RuntimeError(f"PEFT already has a method registered as {PEFT_TYPE!r} ({present!r}), not "
                               "hf_layercollapse's: another installed package uses that name, and hf_layercollapse "
                               "does not overwrite it. Uninstall that package to use LayerCollapse through PEFT.")
    for mapping, ours in entries:
        mapping[PEFT_TYPE] = ours
