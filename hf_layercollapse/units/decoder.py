"""Units wider than an MLP block: spans of consecutive decoder layers of a decoder-only LLM.

A decoder layer of a Llama-style model adds its attention and its MLP to the residual stream:
``h' = h + attn(norm(h))``, ``out = h' + mlp(norm(h'))``. A span of layers ``s … s+n−1`` can then be replaced by one
linear map ``T`` of the MLP output ``M`` of the layer before it (the ReplaceMe construction): the layer ``s−1`` computes
``h' + M·T`` instead of ``h' + M``, which ``T`` makes close to the hidden state after the span, and ``T`` is fused into
that layer's output projection (``W_down ← Tᵀ·W_down``). Removing the span outright is ``T = I`` (ShortGPT's cut).
Either way the result is the *stock* architecture with ``n`` fewer layers (:func:`cut_layers`): it saves with
``save_pretrained`` and loads with plain transformers, without this library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..modules import projection_shape, submodule
from ..statistics import Dims
from .layout import BlockKind, Costs, Layout, MLPLayout, Tap, Unit, _Mismatch
from .table import check_not_moe, sub_configs


@dataclass(frozen=True)
class SpanLayout(Layout):
    """Decoder layers ``start … start+length−1`` of the layer list that owns them (``model.layers``), with the output
    projection of the layer before them (``fuse``, relative to a layer: ``mlp.down_proj``) that takes the map."""

    kind: ClassVar[BlockKind] = BlockKind.SPAN
    start: int
    length: int
    fuse: str = "mlp.down_proj"

    def __post_init__(self) -> None:
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 1:
            raise ValueError(f"a span starts at a layer >= 1 (the layer before it takes the map), not {self.start!r}")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"a span has at least one layer, not {self.length!r}")

    @property
    def layers(self) -> tuple[str, ...]:
        """The names of the span's layers, relative to the layer list."""
        return tuple(str(i) for i in range(self.start, self.start + self.length))

    @property
    def end(self) -> int:
        """The index after the span's last layer."""
        return self.start + self.length

    @property
    def inputs(self) -> tuple[str, ...]:
        return (f"{self.start - 1}.{self.fuse}",)

    @property
    def output(self) -> str:
        return self.layers[-1]

    @property
    def parts(self) -> tuple[str, ...]:
        return (*self.inputs, *self.layers)

    def dims(self, owner: nn.Module) -> Dims:
        d = projection_shape(owner.get_submodule(self.inputs[0]))[1]
        return Dims(d, d, d)

    def taps(self) -> dict[str, Tap]:
        # x: the MLP output M of the layer before the span; h: the hidden state entering the span; y: after it
        return {"x": Tap(self.inputs[0], post=True), "h": Tap(self.layers[0], post=False),
                "y": Tap(self.output, post=True)}

    def check(self, owner: nn.Module) -> None:
        if not isinstance(owner, nn.ModuleList) or self.end > len(owner):
            raise _Mismatch(f"layers {self.start}..{self.end - 1} are not in a layer list of {len(owner)} layers")
        self._modules(owner)

    def costs(self, owner: nn.Module, merged_bias: bool) -> Costs:
        layers = [owner[i] for i in range(self.start, self.end)]
        params = sum(p.numel() for layer in layers for p in layer.parameters())
        flops = sum(2 * projection_shape(m)[0] * projection_shape(m)[1] for layer in layers
                    for m in layer.modules() if isinstance(m, nn.Linear))
        return Costs(params, 0, flops, 0)

    def install(self, owner: nn.Module, merged: nn.Module) -> None:
        raise TypeError("A span changes the model's depth: apply it with hf_layercollapse.units.cut_layers(model, "
                        "...), which also renumbers the layers and updates the config.")

    def _fields(self) -> dict[str, Any]:
        return {"start": self.start, "length": self.length, "fuse": self.fuse}

    @classmethod
    def _from_fields(cls, data: dict[str, Any]) -> SpanLayout:
        return cls(data["start"], data["length"], data.get("fuse", "mlp.down_proj"))


@dataclass(frozen=True)
class DecoderStack:
    """The decoder layers of a decoder-only model: the layer list's name, each layer's MLP unit (names relative to
    the model), the output projection of a layer's MLP (relative to the layer), and whether a map can be fused into
    it (the MLP output is added to the residual stream as it is)."""

    name: str
    mlps: tuple[Unit, ...]
    fuse: str
    fusable: bool

    def __len__(self) -> int:
        return len(self.mlps)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return submodule(model, self.name)

    def span(self, start: int, length: int) -> Unit:
        """The unit of layers ``start … start+length−1``."""
        return Unit(self.name, start, SpanLayout(start, length, self.fuse))


def decoder_stack(model: nn.Module, mlps: list[Unit]) -> DecoderStack:
    """The decoder stack of a decoder-only LLM whose MLP units are ``mlps`` (one per layer); a clear error for the
    layouts spans cannot handle: encoder-decoder models, mixture-of-experts, tied (shared) layers, a layer list that is
    not one MLP per layer."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is not a decoder-only model: spans of decoder layers can only be "
                         "removed from decoder-only LLMs. Use units=('mlp',) for this model.")
    check_not_moe(model)
    count = getattr(text, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    owners = {u.name: u for u in mlps}
    for name, layers in lists:
        prefix = f"{name}." if name else ""
        per_layer = [[u for n, u in owners.items() if n.startswith(f"{prefix}{i}.")] for i in range(len(layers))]
        if not all(len(found) == 1 for found in per_layer):
            continue
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError(f"The layers of {name!r} are shared (one module used several times): a span cannot be "
                             "removed from them. Use units=('mlp',).")
        units = tuple(found[0] for found in per_layer)
        rel = [u.name[len(f"{prefix}{i}."):] for i, u in enumerate(units)]
        if len(set(rel)) != 1 or len({type(u.layout) for u in units}) != 1:
            raise ValueError(f"The MLP blocks of {name!r} do not sit at the same place in every layer ({set(rel)}): "
                             "spans need a uniform decoder stack. Use units=('mlp',).")
        layout = units[0].layout
        assert isinstance(layout, MLPLayout)
        fuse = f"{rel[0]}.{layout.output}"
        return DecoderStack(name, units, fuse, _adds_mlp_output(model, layers, rel[0]))
    raise ValueError(f"No list of {count} decoder layers with one MLP block each was found in {type(model).__name__}: "
                     "spans of layers need a decoder-only LLM (Llama, Mistral, Qwen2, Gemma, Phi-3...). Use "
                     "units=('mlp',).")


@torch.no_grad()
def _adds_mlp_output(model: nn.Module, layers: nn.ModuleList, mlp: str) -> bool:
    """Whether the layers add their MLP's output to the residual stream as it is (``out = h' + mlp(...)``), checked
    on the first layer with one small forward pass: with the MLP's output set to zero the layer must give
    ``out − M``. (Gemma-2 and -3 normalise the MLP output first; a map fused into its output projection would not act
    linearly on the residual stream there.)"""
    from .tracing import dummy_inputs

    layer, block = layers[0], layers[0].get_submodule(mlp)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda m, args, out: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    inputs = {k: v for k, v in dummy_inputs(model).items() if k != "labels"}
    handles = [layer.register_forward_hook(keep("out")), block.register_forward_hook(keep("mlp"))]
    try:
        model(**inputs)
        out, mlp_out = seen["out"].clone(), seen["mlp"].clone()
        handles.append(block.register_forward_hook(lambda m, args, out: torch.zeros_like(out)))
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    expected = out - mlp_out
    relative = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 3e-2  # bf16/fp16 rounding (a normalised
    # MLP output, Gemma-2's, differs by its own size)
    difference = (seen["out"].float() - expected.float()).abs().max()
    return bool(difference <= relative * expected.float().abs().max().clamp(min=1e-6))


@dataclass(frozen=True)
class Cut:
    """One span to remove, and what the layer before it takes: nothing (a plain cut), a map ``T`` (``[d, d]``) fused
    into its MLP's output projection (``W ← Tᵀ·W``), or a new ``weight`` for that projection (same shape)."""

    layout: SpanLayout
    transform: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    @property
    def fuses(self) -> bool:
        return self.transform is not None or self.weight is not None


@torch.no_grad()
def cut_layers(model: nn.Module, stack: DecoderStack, cuts: list[Cut]) -> dict[int, int]:
    """Remove each cut's layers from ``model`` and change the layer before it as the :class:`Cut` says, in place;
    renumber the layers (``layer_idx`` of their attention, the config's ``num_hidden_layers`` and ``layer_types``).
    Returns ``{old layer index: new index}`` of the layers kept.

    Spans must not overlap, and the layer a span fuses into must not be removed by another span.
    """
    layers = stack.layers(model)
    removed = {i for cut in cuts for i in range(cut.layout.start, cut.layout.end)}
    for cut in cuts:
        if cut.fuses and cut.layout.start - 1 in removed:
            raise ValueError(f"Layer {cut.layout.start - 1} takes the map of the span {cut.layout.start}.."
                             f"{cut.layout.end - 1} but another span removes it.")
        if cut.fuses and not stack.fusable:
            raise ValueError("The layers normalise their MLP output before adding it to the residual stream: a map "
                             "cannot be fused into it. Use plain cuts.")
    if len(removed) != sum(cut.layout.length for cut in cuts):
        raise ValueError("Spans overlap.")
    for cut in cuts:
        if not cut.fuses:
            continue
        projection = layers[cut.layout.start - 1].get_submodule(stack.fuse)
        weight = projection.weight.detach()
        if cut.weight is not None:
            if tuple(cut.weight.shape) != tuple(weight.shape):
                raise ValueError(f"The new weight of layer {cut.layout.start - 1}'s {stack.fuse} is "
                                 f"{tuple(cut.weight.shape)}, not {tuple(weight.shape)}: it belongs to another model.")
            projection.weight.copy_(cut.weight.to(weight))
            continue
        t = cut.transform.to(weight.device, torch.promote_types(weight.dtype, torch.float32))
        if tuple(t.shape) != (weight.shape[0], weight.shape[0]):
            raise ValueError(f"The map of the span {cut.layout.start}..{cut.layout.end - 1} is {tuple(t.shape)}, not "
                             f"{(weight.shape[0],) * 2}: it belongs to another model.")
        projection.weight.copy_((t.T @ weight.to(t.dtype)).to(weight.dtype))  # M·T with M = W_down·a (+ b)
        if projection.bias is not None:
            projection.bias.copy_((projection.bias.to(t.dtype) @ t).to(projection.bias.dtype))
    kept = [i for i in range(len(layers)) if i not in removed]
    mapping = {old: new for new, old in enumerate(kept)}
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new, layer in enumerate(new_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    parent, _, child = stack.name.rpartition(".")
    setattr(submodule(model, parent), child, new_layers)
    for config in sub_configs(model):
        if getattr(config, "num_hidden_layers", None) == len(layers):
            config.num_hidden_layers = len(kept)
            types = getattr(config, "layer_types", None)
            if isinstance(types, (list, tuple)) and len(types) == len(layers):
                config.layer_types = [types[i] for i in kept]
    return mapping
