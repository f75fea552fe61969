"""`LayerCollapseLayer`: the PEFT tuner layer around a unit's activation, one α and one target per adapter."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..activation import CollapsibleModule
from ..config import CollapseConfig
from ..errors import LayerCollapseConfigError
from ..modules import out_of_place
from ..targets import GateConstant, Identity, Line, LinearTarget, LowRankAffine, PReLU, target_for
from ..units import Layout

#: Prefix of the LayerCollapse entries in PEFT state dicts (``...act.layercollapse_alpha.<adapter>``,
#: ``...act.layercollapse_gate_constant.<adapter>``, ``...act.layercollapse_slope.<adapter>`` / ``_offset``).
PEFT_PREFIX = "layercollapse_"
#: The targets an adapter can hold (an affine target's trainable d×d map per block is not offered through PEFT: its
#: low-rank form is).
ADAPTER_TARGETS: tuple[type[LinearTarget], ...] = (Identity, PReLU, Line, GateConstant, LowRankAffine)
_TRAINABLE = tuple(dict.fromkeys(n for t in ADAPTER_TARGETS for n in t.tensor_names if t.trainable_tensor(n)))
_FIXED = tuple(dict.fromkeys(n for t in ADAPTER_TARGETS for n in t.tensor_names if not t.trainable_tensor(n)))


class LayerCollapseLayer(CollapsibleModule, BaseTunerLayer):
    """PEFT tuner layer around an MLP block's activation: α lives in a ``ParameterDict`` keyed by adapter name
    (``layercollapse_alpha``), as PEFT expects, and so do the target's tensors (``layercollapse_<name>``: a gated
    block's trainable ``c``, a plain block's fitted line as fixed buffers, a low-rank affine target's fitted map as a
    fixed buffer and its correction trainable, saved with the adapter). Each adapter has
    its own target (``layercollapse_target``); ``alpha``, ``target`` and :meth:`target_tensors` are those of the
    active adapter, so :func:`~hf_layercollapse.injected_activations`, :func:`~hf_layercollapse.regularization_loss`
    and :class:`~hf_layercollapse.LayerCollapseTrainer` work on PEFT models unchanged. With adapters disabled (or no
    adapter of this layer active) the layer is the original activation. Loading an adapter whose α or target
    tensors do not fit the block raises :class:`~hf_layercollapse.LayerCollapseConfigError` naming the module.

    Args:
        base_layer: The original activation module.
        adapter_name: Name of the first adapter.
        layout: The MLP block's layout.
        config: The adapter's settings (``activation``, ``linear_target``, ``init_alpha``).
        tensors: The target's initial tensors, by name (none for the identity and PReLU targets).

    Example:
        >>> import torch
        >>> from hf_layercollapse import LayerCollapseConfig, LayerCollapseLayer
        >>> from hf_layercollapse.units import PlainLayout
        >>> layer = LayerCollapseLayer(torch.nn.GELU(), "default", PlainLayout("fc1", "act", "fc2"),
        ...                            LayerCollapseConfig())
        >>> x = torch.randn(3)
        >>> torch.equal(layer(x), torch.nn.functional.gelu(x)), layer.alpha_value
        (True, 0.0)
        >>> _ = layer.alpha.data.fill_(1.0)
        >>> torch.equal(layer(x), x)
        True
    """

    adapter_layer_names = ("layercollapse_alpha", *(PEFT_PREFIX + n for n in _TRAINABLE))
    other_param_names = (*(PEFT_PREFIX + n for n in _FIXED), "layercollapse_target")

    def __init__(self, base_layer: nn.Module, adapter_name: str, layout: Layout, config: CollapseConfig,
                 tensors: Mapping[str, torch.Tensor] | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        self.base_layer = out_of_place(base_layer)
        self.layout = layout
        self.layercollapse_alpha = nn.ParameterDict()
        for name in _TRAINABLE:
            setattr(self, PEFT_PREFIX + name, nn.ParameterDict())
        for name in _FIXED:
            setattr(self, PEFT_PREFIX + name, BufferDict(persistent=True))
        self.layercollapse_target: dict[str, LinearTarget] = {}
        # adapters whose target was fitted on real data (calibrate_linear_targets) or read from a checkpoint, not
        # only on the dummy batch of get_peft_model
        self.layercollapse_calibrated: set[str] = set()
        self._disable_adapters = False
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []  # of unit-replacing targets, on the projections
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self._init_state()
        self.update_layer(adapter_name, config, tensors, device, dtype)

    def update_layer(self, adapter_name: str, config: CollapseConfig,
                     tensors: Mapping[str, torch.Tensor] | None = None, device: torch.device | None = None,
                     dtype: torch.dtype | None = None) -> None:
        """Add adapter ``adapter_name`` with its own α and target (chosen by ``config`` for this block)."""
        target = target_for(self.layout, config.linear_target, config.activation, config.affine_rank)
        if not isinstance(target, ADAPTER_TARGETS):
            raise ValueError(f"The {target.name} target is not offered through PEFT: use get_collapse_model.")
        factory = {"device": device, "dtype": dtype}
        self.layercollapse_alpha[adapter_name] = nn.Parameter(torch.full((1,), float(config.init_alpha), **factory))
        values = dict(tensors or {})
        if set(values) != set(target.tensor_names):
            raise ValueError(f"The {target.name} target needs the tensors {list(target.tensor_names)}, got "
                             f"{sorted(values)}.")
        for name, value in values.items():
            value = value.detach().to(copy=True, **factory)
            getattr(self, PEFT_PREFIX + name)[adapter_name] = (nn.Parameter(value) if target.trainable_tensor(name)
                                                               else value)
        self.layercollapse_target[adapter_name] = target
        self.set_adapter(self.active_adapters)

    def _adapter(self) -> str:
        present = [a for a in self.active_adapters if a in self.layercollapse_alpha]
        if len(present) > 1:
            raise ValueError(f"LayerCollapse adapters {present} are active together on one block; activate only one.")
        if present:
            return present[0]
        if not self.layercollapse_alpha:
            raise ValueError("This LayerCollapse layer holds no adapter.")
        return next(iter(self.layercollapse_alpha))

    @property
    def alpha(self) -> nn.Parameter:  # type: ignore[override]
        """α of the active adapter (shape ``(1,)``)."""
        return self.layercollapse_alpha[self._adapter()]

    @property
    def target(self) -> LinearTarget:  # type: ignore[override]
        """The target of the active adapter."""
        return self.layercollapse_target[self._adapter()]

    def target_tensors(self, adapter: str | None = None) -> dict[str, torch.Tensor]:
        """The target's tensors of ``adapter`` (default: the active one), by name."""
        adapter = adapter if adapter is not None else self._adapter()
        return {name: getattr(self, PEFT_PREFIX + name)[adapter]
                for name in self.layercollapse_target[adapter].tensor_names}

    @property
    def activation(self) -> nn.Module:  # type: ignore[override]
        return self.base_layer

    def _bypassed(self) -> bool:
        return self.disable_adapters or not any(a in self.layercollapse_alpha for a in self.active_adapters)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._bypassed():
            return self.base_layer(hidden_states)
        return super().forward(hidden_states)

    def attach_hooks(self, owner: nn.Module) -> None:
        """Register the hooks of the adapters' unit-replacing targets (the low-rank affine target) on the unit's
        projections in ``owner`` (the MLP block), once (:meth:`detach_hooks` removes them); the tuner calls it after
        LoRA wrapped the projections, so that the blend sees the LoRA-adapted ones."""
        replacing = [t for t in self.layercollapse_target.values() if t.replaces_unit]
        if replacing and not self._hooks:
            self._hooks = replacing[0].attach(self, owner, self.layout)

    def detach_hooks(self) -> None:
        """Remove the hooks of :meth:`attach_hooks`."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _see_input(self, module: nn.Module, args: tuple) -> None:
        if not self._bypassed():
            super()._see_input(module, args)

    def _blend_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output if self._bypassed() else super()._blend_output(module, args, output)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "A LayerCollapse α cannot be merged into the weights in place: merging happens by collapsing whole MLP "
            "blocks. Use `model = peft_model.merge_and_unload()` (or hf_layercollapse.merge_lora_and_collapse)."
        )

    def unmerge(self) -> None:
        """Nothing to undo: LayerCollapse layers are never merged in place."""

    def delete_adapter(self, adapter_name: str) -> None:
        self.layercollapse_calibrated.discard(adapter_name)
        super().delete_adapter(adapter_name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # torch would report a wrong shape as "size mismatch for ...", after reading the whole state dict; say which
        # block the adapter does not fit, and why.
        for kind in self.adapter_layer_names + self.other_param_names[:-1]:
            for adapter, param in getattr(self, kind).items():
                value = state_dict.get(f"{prefix}{kind}.{adapter}")
                if isinstance(value, torch.Tensor) and value.shape != param.shape:
                    what = "values" if kind == "layercollapse_alpha" else "intermediate channels"
                    raise LayerCollapseConfigError(
                        f"The adapter checkpoint's {kind} of {prefix.rstrip('.')!r} (adapter {adapter!r}) has shape "
                        f"{tuple(value.shape)}, but this MLP block needs {tuple(param.shape)} ({param.numel()} "
                        f"{what}): the adapter was trained on another model; nothing was loaded."
                    )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.layercollapse_calibrated.update(a for a, t in self.layercollapse_target.items() if t.tensor_names and
                                             f"{prefix}{PEFT_PREFIX}{t.tensor_names[0]}.{a}" in state_dict)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{a}: {self.layercollapse_target[a].name} α={float(p.detach().float()[0]):.4f}"
                             for a, p in self.layercollapse_alpha.items())
        return f"layout={self.layout.act!r}, adapters={{{adapters}}}"
