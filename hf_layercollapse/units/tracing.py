"""A data-flow tracer that finds MLP blocks (units) in models whose layout is not in the table.

One forward pass on example inputs records every leaf-module call and every tensor operation between them
(through a ``TorchFunctionMode``). An MLP block is then a projection whose output reaches a parameter-free
activation module whose output reaches another projection, allowing pass-through steps (dropout, dtype
casts, reshapes) in between. A gated block is the same with the activation's output multiplied by the
output of a second projection (or the other half of a fused ``gate_up_proj``) before the last projection.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from transformers import PreTrainedModel

from ..modules import PROJECTIONS, WrappedActivation, base_prefix, join, module_order
from .layout import GatedLayout, Layout, PlainLayout, Unit

_PASS_THROUGH_OPS = {"dropout", "to", "contiguous", "view", "reshape", "clone", "float", "half", "bfloat16",
                     "type", "type_as", "detach"}
_PASS_THROUGH_MODULES = (nn.Dropout, nn.Identity)
_SPLIT_OPS = {"chunk", "split", "tensor_split", "unbind", "__getitem__"}
_MUL_OPS = {"mul", "__mul__", "__rmul__", "mul_"}


@dataclass
class _Node:
    name: str  # module name, or the op's function name
    module: nn.Module | None
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _op_name(func) -> str:
    name = getattr(func, "__name__", str(func))
    return name.rstrip("_") if name.endswith("_") and not name.startswith("__") else name


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.nodes: list[_Node] = []
        self.keep: list[torch.Tensor] = []  # keeps tensors alive so that id() stays unique
        self.depth = 0
        self.handles = []
        # Every name of each module: one module object may sit under several names (XLM's FFNs all hold the
        # same module-level `gelu`); hooks fire once per call under the first name.
        self.aliases: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.aliases.setdefault(id(module), []).append(name)
        for name, module in model.named_modules():
            if next(module.children(), None) is None or isinstance(module, WrappedActivation):
                self.handles.append(module.register_forward_pre_hook(self._enter))
                self.handles.append(module.register_forward_hook(self._make_exit(name)))

    def _ids(self, obj) -> list[int]:
        tensors = _tensors(obj)
        self.keep.extend(tensors)
        return [id(t) for t in tensors]

    def _enter(self, module, args):
        self.depth += 1

    def _make_exit(self, name: str):
        def exit_hook(module, args, output):
            self.depth -= 1
            self.nodes.append(_Node(name, module, self._ids(args), self._ids(output)))

        return exit_hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            outputs = self._ids(out)
            if outputs:  # attribute reads such as `x.dtype` produce no tensor and are not data flow
                self.nodes.append(_Node(_op_name(func), None, self._ids((args, kwargs)), outputs))
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _first_value(config, names: tuple[str, ...], default=None):
    """An attribute of the config or of one of its sub-configs (CLIP's ``text_config``, ``vision_config``)."""
    configs = [config] + [v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
    for cfg in configs:
        for name in names:
            value = getattr(cfg, name, None)
            if value is not None:
                return value
    return default


def dummy_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Small inputs for one forward pass of a ``transformers`` model, built from its config and signature."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} has no `config` to build example inputs from: pass example_inputs= with one batch "
            "(a dict of the forward's keyword arguments)."
        )
    params = inspect.signature(model.forward).parameters
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype if weight.is_floating_point() else torch.float32
    inputs: dict[str, torch.Tensor] = {}
    if "input_ids" in params:
        vocab = int(_first_value(config, ("vocab_size",), 100))
        inputs["input_ids"] = (torch.arange(8, device=device) % max(vocab - 1, 1) + 1).unsqueeze(0)
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "pixel_values" in params:
        channels = int(_first_value(config, ("num_channels",), 3))
        size = _first_value(config, ("image_size",), 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        inputs["pixel_values"] = torch.randn(1, channels, height, width, device=device, dtype=dtype)
    if "input_features" in params:
        mels = int(_first_value(config, ("num_mel_bins",), 80))
        frames = 2 * int(_first_value(config, ("max_source_positions",), 1500))
        inputs["input_features"] = torch.randn(1, mels, frames, device=device, dtype=dtype)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        start = getattr(config, "decoder_start_token_id", None) or 0
        inputs["decoder_input_ids"] = torch.full((1, 4), int(start), device=device, dtype=torch.long)
    if not inputs:
        raise ValueError(
            f"Cannot build example inputs for {type(model).__name__}: pass example_inputs= with one batch."
        )
    return inputs


def _is_activation(node: _Node) -> bool:
    module = node.module
    if isinstance(module, WrappedActivation):
        return True
    return (
        module is not None
        and not isinstance(module, PROJECTIONS + _PASS_THROUGH_MODULES)
        and next(module.parameters(recurse=False), None) is None
        and len(node.inputs) == 1
        and len(node.outputs) == 1
    )


def _output_ids(obj) -> set[int]:
    """The tensors that a model's forward returns (nested in ModelOutputs, dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return {id(obj)}
    if isinstance(obj, dict):  # ModelOutput is an OrderedDict
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return set().union(*(_output_ids(v) for v in obj))
    return {id(t) for t in _tensors(obj)}


class _Graph:
    def __init__(self, nodes: list[_Node], sizes: dict[int, int], returned: set[int] | None = None) -> None:
        self.nodes = nodes
        self.sizes = sizes
        self.returned = returned or set()  # tensors the model returns: they leave any block they are made in
        self.producer: dict[int, _Node] = {}
        self.consumers: dict[int, list[_Node]] = {}
        for node in nodes:
            for t in node.outputs:
                if t not in node.inputs:  # an eval-mode dropout returns its input: not a producer
                    self.producer[t] = node
            for t in dict.fromkeys(node.inputs):
                self.consumers.setdefault(t, []).append(node)

    def _pass_through(self, node: _Node) -> bool:
        if node.module is not None:
            return isinstance(node.module, _PASS_THROUGH_MODULES)
        return (node.name in _PASS_THROUGH_OPS and len(node.outputs) == 1
                and self.sizes.get(node.inputs[0]) == self.sizes.get(node.outputs[0]))

    def _private(self, tensor: int) -> bool:
        """Whether ``tensor`` goes nowhere but to its one next step inside a block (or to the split ops that cut a
        fused projection's output in parts): not returned by the model, not also read by another module or op."""
        if tensor in self.returned:
            return False
        consumers = [n for n in self.consumers.get(tensor, []) if tensor not in n.outputs]
        return len(consumers) == 1 or (bool(consumers) and all(n.name in _SPLIT_OPS for n in consumers))

    def source(self, tensor: int) -> tuple[_Node | None, int | None]:
        """The projection that produced ``tensor`` (through pass-through steps), and which split part it is; none
        when a tensor on the way also leaves the block (another consumer, or a model output)."""
        if not self._private(tensor):
            return None, None
        node = self.producer.get(tensor)
        part = None
        while node is not None and node.module is None:
            if node.name in _SPLIT_OPS and part is None:
                part = node.outputs.index(tensor)
            elif not self._pass_through(node):
                return None, None
            tensor = node.inputs[0]
            if not self._private(tensor):
                return None, None
            node = self.producer.get(tensor)
        if node is not None and isinstance(node.module, _PASS_THROUGH_MODULES):
            return self.source(node.inputs[0])
        return (node, part) if node is not None and isinstance(node.module, PROJECTIONS) else (None, None)

    def sink(self, tensor: int) -> tuple[_Node | None, list[str], int]:
        """Where ``tensor`` goes: the consuming node after pass-through steps, the dropout modules passed, and
        the tensor that reaches it."""
        dropouts: list[str] = []
        while True:
            if tensor in self.returned:  # the model returns it: it leaves the block (BLIP's pooler output)
                return None, dropouts, tensor
            consumers = self.consumers.get(tensor, [])
            aliases = [n for n in consumers if tensor in n.outputs]  # steps that return their input
            dropouts += [n.name for n in aliases if isinstance(n.module, nn.Dropout)]
            consumers = [n for n in consumers if tensor not in n.outputs]
            if len(consumers) != 1:
                return None, dropouts, tensor
            node = consumers[0]
            if not self._pass_through(node):
                return node, dropouts, tensor
            if node.module is not None and isinstance(node.module, nn.Dropout):
                dropouts.append(node.name)
            tensor = node.outputs[0]


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


def _relative(prefix: str, name: str) -> str:
    return name[len(prefix) + 1:] if prefix else name


def _block_from(act: _Node, graph: _Graph, aliases: list[str] | None = None) -> tuple[str, Layout] | None:
    fc1, fc1_part = graph.source(act.inputs[0])
    if fc1 is None:
        return None
    consumer, dropouts, reaching = graph.sink(act.outputs[0])
    if consumer is None:
        return None
    gate = None
    if consumer.module is None and consumer.name in _MUL_OPS and len(consumer.inputs) == 2:
        other = consumer.inputs[1] if consumer.inputs[0] == reaching else consumer.inputs[0]
        up, _ = graph.source(other)
        if up is None or (up is fc1 and fc1_part not in (None, 0)):
            return None  # a fused projection whose gate is not its first half (the gated layout's order)
        gate, fc1 = fc1, up
        consumer, more, _ = graph.sink(consumer.outputs[0])
        dropouts += more
        if consumer is None:
            return None
    elif fc1_part is not None:
        return None
    if consumer.module is None or not isinstance(consumer.module, PROJECTIONS) or consumer is fc1:
        return None
    act_name = act.name
    if aliases and len(aliases) > 1:  # a shared activation module: take the name that lies in this block
        act_name = max(aliases, key=lambda n: len(_common_prefix([fc1.name, n, consumer.name])))
    names = [fc1.name, act_name, consumer.name] + ([gate.name] if gate else [])
    prefix = _common_prefix(names)
    rel = [_relative(prefix, n) for n in names]
    dropout_names = tuple(_relative(prefix, d) for d in dropouts)
    if gate is not None:
        return prefix, GatedLayout(rel[3], rel[0], rel[1], rel[2], dropout_names)
    return prefix, PlainLayout(rel[0], rel[1], rel[2], dropout_names)


def trace_units(model: nn.Module, example_inputs: dict[str, torch.Tensor] | None = None) -> list[Unit]:
    """Find MLP blocks by tracing one forward pass (see the module docstring).

    Raises ValueError when one activation module serves several different blocks (they could not each get
    their own α).
    """
    inputs = dummy_inputs(model) if example_inputs is None else example_inputs
    was_training = model.training
    recorder = _Recorder(model)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        model.eval()
        with torch.no_grad(), recorder:
            output = model(**inputs)
    finally:
        recorder.remove()
        model.train(was_training)
    sizes = {id(t): t.numel() for t in recorder.keep}
    graph = _Graph(recorder.nodes, sizes, _output_ids(output))
    found: dict[str, Layout] = {}
    act_owner: dict[str, str] = {}  # activation -> "fc1 -> fc2" of the block it was first seen in
    # a task head on top of a transformers base model can look like a block (ALBERT's pooler → tanh → classifier):
    # it is none of the transformer's MLPs, and a checkpoint could not record it (record names are relative to the base)
    base = base_prefix(model) if isinstance(model, PreTrainedModel) else ""
    for node in recorder.nodes:
        if not _is_activation(node):
            continue
        block = _block_from(node, graph, recorder.aliases.get(id(node.module)))
        if block is None:
            continue
        prefix, layout = block
        if base and not all(join(prefix, part).startswith(base + ".") for part in layout.parts):
            continue
        if not prefix and isinstance(model, PreTrainedModel):
            continue  # projections that meet only at a transformers model's root: a pooler and a head, no MLP block
        act_name = f"{prefix}.{layout.act}" if prefix else layout.act
        # the same activation between other projections (a shared block such as ALBERT's reuses all three)
        owner = " -> ".join(join(prefix, part) for part in (layout.inputs[0], layout.output))
        if act_owner.setdefault(act_name, owner) != owner:
            raise ValueError(
                f"Activation module {act_name!r} is shared by MLP blocks {act_owner[act_name]!r} and {owner!r}: "
                "they cannot each get their own α. Give each block its own activation module."
            )
        found.setdefault(prefix, layout)
    order = module_order(model)
    names = sorted(found, key=lambda n: order.get(n, len(order)))
    return [Unit(name, i, found[name]) for i, name in enumerate(names)]
