"""`export_onnx`: a second runtime for (collapsed) models — export to ONNX with PyTorch's exporter, check the file in
onnxruntime against the PyTorch model.

A collapsed checkpoint is a stock architecture whose merged blocks are ``Identity`` modules and one projection, so
the exported graph simply has fewer ``MatMul`` weights; nothing of this library is needed to run it.

Needs ``pip install 'hf-layercollapse[onnx]'`` (onnx, onnxruntime, onnxscript); they are imported when the
function runs, so the package imports without them.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .activation import CollapsibleModule
from .units import dummy_inputs

__all__ = ["ONNX_INSTALL", "ExportResult", "ONNXVerificationError", "export_onnx"]

#: How to install what the export needs.
ONNX_INSTALL = "pip install 'hf-layercollapse[onnx]'"
#: Inputs whose dimensions are (batch, sequence); the ``decoder_`` ones have a sequence length of their own.
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
DECODER_INPUTS = ("decoder_input_ids", "decoder_attention_mask")
#: The example batch built when none is given, and how the second verification batch differs from the first.
DEFAULT_BATCH, EXTRA_BATCH, EXTRA_SEQUENCE = 2, 1, 3
# torch.onnx's known, harmless chatter during a dynamo export (named dims that share one constraint, deprecations).
# The attributes an injected block's forward records (its α, its regulariser term) are put back after the export.
_QUIET = ("The axis name", "`isinstance(treespec", "Exporting a model while it is in training mode",
          "were assigned during export")


class ONNXVerificationError(ValueError):
    """onnxruntime's outputs for the exported file differ from the PyTorch model's by more than ``atol``."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    #: Largest |onnxruntime − PyTorch| over every output and verification batch; ``None`` when not verified.
    max_abs_diff: float | None = None
    #: Shape of every input of each verification batch (the example, then one of another batch/sequence size).
    verified_shapes: tuple[dict[str, tuple[int, ...]], ...] = ()
    atol: float = 1e-4

    def __str__(self) -> str:
        text = (f"exported {self.path} (ONNX opset {self.opset}; inputs {', '.join(self.input_names)}; "
                f"outputs {', '.join(self.output_names)})")
        if self.max_abs_diff is None:
            return text + "; not verified"
        shapes = " and ".join(str(next(iter(s.values()))) for s in self.verified_shapes)
        return (text + f"\nonnxruntime vs PyTorch: max |difference| = {self.max_abs_diff:.3g} "
                f"(≤ atol {self.atol:g}) on batches of shape {shapes}")


def export_onnx(
    model: nn.Module,
    output_path: str | os.PathLike[str],
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    *,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` (a collapsed or plain ``PreTrainedModel``) to an ONNX file with dynamic batch and sequence
    axes, and check it in onnxruntime (CPU) against the PyTorch model. Models over protobuf's 2 GB limit get an
    external-data file beside it.

    Args:
        model: the model; it runs in eval mode during the export (its mode is restored afterwards). Causal LMs are
            exported with ``use_cache=False``: their only output is ``logits``.
        output_path: the ``.onnx`` file to write (its folder is created). Written atomically: the file appears only
            once exported and verified.
        example_inputs: one batch, as the forward's keyword arguments (default: ``input_ids`` and
            ``attention_mask`` of shape (2, 8) for text models, built from the model's ``main_input_name``).
        opset: ONNX opset version (default: the exporter's).
        verify: run the file in onnxruntime on the example batch and on a second batch of another batch size and
            sequence length, and raise :class:`ONNXVerificationError` when an output differs by more than ``atol``.
        atol: the largest accepted absolute difference.

    Example:
        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> import hf_layercollapse as hlc
        >>> _ = torch.manual_seed(0)
        >>> model = BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=64)).eval()
        >>> _ = hlc.get_collapse_model(model)
        >>> for activation in hlc.injected_activations(model).values():
        ...     _ = activation.alpha.data.fill_(1.0)  # as if fine-tuned to α = 1
        >>> _ = hlc.collapse_model(model)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     result = export_onnx(model, f"{folder}/model.onnx")
        >>> result.input_names, result.output_names, result.max_abs_diff < 1e-4
        (('input_ids', 'attention_mask'), ('logits',), True)
    """
    onnx, ort = _require_onnx()
    path = _check_arguments(model, output_path, opset, atol)
    inputs = _default_inputs(model) if example_inputs is None else _checked_inputs(example_inputs)
    folder = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=path.parent))
    training, recorded = model.training, _recorded_state(model)
    model.eval()
    try:
        forward = _Forward(model, inputs)
        draft = folder / path.name
        _export(forward, inputs, draft, opset)
        proto = onnx.load(str(draft), load_external_data=False)
        result = ExportResult(path, tuple(i.name for i in proto.graph.input), tuple(o.name for o in proto.graph.output),
                              _opset_of(proto), atol=atol)
        if verify:
            batches = [inputs, _variant(model, inputs, EXTRA_BATCH, EXTRA_SEQUENCE, pad=True)]
            worst = _verify(ort, draft, forward, batches, atol, path)
            shapes = tuple({k: tuple(v.shape) for k, v in b.items()} for b in batches)
            result = replace(result, max_abs_diff=worst, verified_shapes=shapes)
        _publish(folder, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        model.train(training)
        for module, state in recorded:
            module.__dict__.update(state)
    return result


# ------------------------------------------------------------------------------------------------ arguments


def _require_onnx() -> tuple[Any, Any]:
    """``onnx`` and ``onnxruntime`` (and the check that ``onnxscript``, which the exporter needs, is there)."""
    modules = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            modules.append(__import__(name))
        except ImportError as err:
            raise ImportError(f"export_onnx needs the {name!r} package, which is not installed ({err}): "
                              f"{ONNX_INSTALL}") from err
    return modules[0], modules[1]


def _check_arguments(model: nn.Module, output_path: str | os.PathLike[str], opset: int | None, atol: float) -> Path:
    """The output path (its folder created) once the arguments are valid."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__}: export_onnx takes a torch.nn.Module (a PreTrainedModel); "
                        "load the checkpoint with AutoModelForX.from_pretrained first.")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 1):
        raise ValueError(f"opset={opset!r}: give a positive integer ONNX opset version (such as 18), or None for "
                         "the exporter's default.")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not math.isfinite(atol) or atol < 0:
        raise ValueError(f"atol={atol!r}: give a finite number ≥ 0 (default 1e-4).")
    path = Path(output_path)
    if path.is_dir():
        raise ValueError(f"output_path={str(output_path)!r} is a directory: give a file path such as "
                         f"{str(path / 'model.onnx')!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _checked_inputs(example_inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise ValueError(f"example_inputs={type(example_inputs).__name__}: give a non-empty dict of the forward's "
                         "keyword arguments, such as a tokenizer's output with return_tensors='pt'.")
    inputs = {}
    for name, value in example_inputs.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"example_inputs[{name!r}] is a {type(value).__name__}: ONNX inputs are tensors; pass "
                             "tensors only (return_tensors='pt').")
        inputs[str(name)] = value
    return inputs


def _default_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A batch of ``DEFAULT_BATCH`` from the model's config and signature (text: ``input_ids`` + ``attention_mask``,
    8 tokens); the model's ``main_input_name`` must be among them."""
    inputs = dummy_inputs(model)
    main = getattr(model, "main_input_name", "input_ids")
    if main not in inputs:
        raise ValueError(f"Cannot build example inputs for {type(model).__name__} (main_input_name={main!r}): pass "
                         "example_inputs= with one batch.")
    return _variant(model, inputs, DEFAULT_BATCH - len(inputs[main]), 0, pad=False)


def _variant(model: nn.Module, inputs: Mapping[str, torch.Tensor], extra_batch: int, extra_sequence: int,
             pad: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch like ``inputs`` with ``extra_batch`` more rows and ``extra_sequence`` more tokens: random token ids,
    masks of ones (with ``pad``, the last row right-padded by 2), zero token types, random floating inputs."""
    generator = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text_config, "vocab_size", 0) or 0)
    batch = {}
    for name, value in inputs.items():
        rows = value.shape[0] + extra_batch if value.dim() else 0
        sequence = name in SEQUENCE_INPUTS + DECODER_INPUTS and value.dim() >= 2
        shape = (rows, value.shape[1] + extra_sequence, *value.shape[2:]) if sequence else (rows, *value.shape[1:])
        batch[name] = _variant_tensor(name, value, shape, vocab, pad, generator)
    return batch


def _variant_tensor(name: str, value: torch.Tensor, shape: tuple[int, ...], vocab: int, pad: bool,
                    generator: torch.Generator) -> torch.Tensor:
    if not value.dim():
        return value
    if name.endswith("input_ids") and vocab > 0:
        new = torch.randint(0, vocab, shape, generator=generator)
    elif name.endswith("attention_mask"):
        new = torch.ones(shape, dtype=torch.long)
        if pad and shape[0] > 1 and shape[1] > 2:
            new[-1, -2:] = 0
    elif name == "token_type_ids":
        new = torch.zeros(shape, dtype=torch.long)
    elif name == "position_ids":
        new = torch.arange(shape[1]).expand(shape).contiguous()
    elif value.is_floating_point():
        new = torch.randn(shape, generator=generator)
    else:  # another input: its rows repeated cyclically
        new = value.cpu()[torch.arange(shape[0]) % value.shape[0]]
    return new.to(device=value.device, dtype=value.dtype)


def _recorded_state(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """What the forward passes of injected (not yet collapsed) blocks record, to put back after export and checks."""
    keys = ("_regularization_term", "last_alpha", "_unit_input", "_unit_output")
    return [(m, {k: m.__dict__[k] for k in keys if k in m.__dict__}) for m in model.modules()
            if isinstance(m, CollapsibleModule)]


# --------------------------------------------------------------------------------------------------- export


class _Forward(nn.Module):
    """``model(**inputs)`` with positional tensors, returning its tensor outputs as a tuple (no KV cache)."""

    def __init__(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.input_names = tuple(inputs)
        parameters = inspect.signature(model.forward).parameters
        self.options = {"return_dict": True} if getattr(model, "config", None) is not None else {}
        if "use_cache" in parameters:
            self.options["use_cache"] = False
        with torch.no_grad():
            out = model(**inputs, **self.options)
        self.output_names = _output_names(out, type(model).__name__)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, tensors)), **self.options)
        if isinstance(out, torch.Tensor):
            return (out,)
        if isinstance(out, (tuple, list)):
            return tuple(out)
        return tuple(out[name] for name in self.output_names)


def _output_names(out: Any, model_name: str) -> tuple[str, ...]:
    if isinstance(out, torch.Tensor):
        return ("output",)
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(f"output_{i}" for i in range(len(out)))
    if isinstance(out, Mapping):
        names = tuple(k for k, v in out.items() if isinstance(v, torch.Tensor))
        if names:
            return names
    raise ValueError(f"{model_name} returned {type(out).__name__} with no tensor output to export: export a model "
                     "whose forward returns tensors (a ModelOutput, a tensor or a tuple of tensors).")


def _dynamic_shapes(inputs: Mapping[str, torch.Tensor]) -> tuple[tuple[dict[int, Any], ...]]:
    """Batch (dim 0) of every input, and sequence (dim 1) of the token inputs, as dynamic dimensions."""
    from torch.export import Dim

    batch, sequence, decoder = Dim("batch"), Dim("sequence"), Dim("decoder_sequence")
    shapes = []
    for name, value in inputs.items():
        dims: dict[int, Any] = {0: batch} if value.dim() else {}
        if value.dim() >= 2 and name in SEQUENCE_INPUTS + DECODER_INPUTS:
            dims[1] = decoder if name in DECODER_INPUTS else sequence
        shapes.append(dims)
    return (tuple(shapes),)  # one entry: the forward's *tensors


def _export(forward: _Forward, inputs: Mapping[str, torch.Tensor], draft: Path, opset: int | None) -> None:
    """torch.onnx.export with the dynamo exporter (torch.export + onnxscript): it traces shapes symbolically, so the
    shape-dependent Python of transformers' masks and RoPE (``if seq > 1``...) stays correct for other batch and
    sequence sizes, and it is the exporter PyTorch maintains. The TorchScript exporter (``dynamo=False``) also runs
    here but bakes such branches in as constants (TracerWarnings) and is deprecated, so it is not used."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for message in _QUIET:
                warnings.filterwarnings("ignore", message=".*" + re.escape(message))
            program = torch.onnx.export(forward.eval(), tuple(inputs.values()), dynamo=True, verbose=False,
                                        opset_version=opset, dynamic_shapes=_dynamic_shapes(inputs),
                                        input_names=list(forward.input_names),
                                        output_names=list(forward.output_names))
            program.save(str(draft))  # external data only for models over the 2 GB protobuf limit
    except Exception as err:
        raise RuntimeError(f"torch.onnx.export (dynamo) failed for {type(forward.model).__name__} with inputs "
                           f"{list(inputs)} and opset={opset}: {type(err).__name__}: {_first_line(err)} — try "
                           "another opset, or pass example_inputs= matching the forward's arguments.") from err
    finally:
        registration.setLevel(level)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _opset_of(proto: Any) -> int:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _publish(folder: Path, path: Path) -> None:
    """Move the exported file(s) of ``folder`` next to ``path`` (``os.replace``: external data first, the model last,
    so that the model never refers to data that is not there yet)."""
    files = sorted(folder.iterdir(), key=lambda f: f.name == path.name)
    for file in files:
        os.replace(file, path.parent / file.name)


# --------------------------------------------------------------------------------------------------- verify


def _verify(ort: Any, draft: Path, forward: _Forward, batches: list[dict[str, torch.Tensor]], atol: float,
            path: Path) -> float:
    """Largest |onnxruntime − PyTorch| over the outputs of every batch; raises when one is above ``atol``."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(draft), options, providers=["CPUExecutionProvider"])
    feeds = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    worst = 0.0
    for batch in batches:
        with torch.no_grad():
            expected = dict(zip(forward.output_names, forward(*batch.values())))
        actual = session.run(names, {k: v.detach().cpu().numpy() for k, v in batch.items() if k in feeds})
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        for name, value in zip(names, actual):
            if tuple(value.shape) != tuple(expected[name].shape):
                raise ONNXVerificationError(
                    f"onnxruntime's output {name!r} has shape {tuple(value.shape)}, PyTorch's "
                    f"{tuple(expected[name].shape)}, on inputs of shapes {shapes}; {path} was not written. A dimension "
                    "was fixed at export: pass example_inputs= whose batch and sequence sizes are both > 1.")
            diff = _max_abs_diff(value, expected[name], batch.get("attention_mask"))
            if not diff <= atol:
                scale = float(expected[name].detach().abs().max()) if expected[name].numel() else 0.0
                raise ONNXVerificationError(
                    f"onnxruntime's output {name!r} differs from PyTorch's by {diff:.3g} (> atol={atol:g}) on inputs "
                    f"of shapes {shapes}, where its largest magnitude is {scale:.3g} (relative difference "
                    f"{diff / max(scale, 1e-30):.2g}); {path} was not written. A relative difference near 1e-6 is "
                    "float32 round-off of a deep model: raise atol= (--atol) to a few times the difference. "
                    "Otherwise export a float32 model (model.float()), or pass verify=False (--no-verify) to write "
                    "the file anyway and investigate.")
            worst = max(worst, diff)
    return worst


def _max_abs_diff(actual: Any, expected: torch.Tensor, attention_mask: torch.Tensor | None) -> float:
    """max |actual − expected| in float64; NaN where the other is not NaN counts as infinite. Positions that the
    attention mask pads out are left out (their values are arbitrary: a left-padded token attends to nothing)."""
    import numpy as np

    reference = expected.detach().cpu().double().numpy()
    value = np.asarray(actual, dtype=np.float64)
    if attention_mask is not None and value.ndim >= 2 and value.shape[:2] == tuple(attention_mask.shape):
        keep = attention_mask.detach().cpu().numpy().astype(bool)
        value, reference = value[keep], reference[keep]
    same = (value == reference) | (np.isnan(value) & np.isnan(reference))
    diff = np.nan_to_num(np.where(same, 0.0, np.abs(value - reference)), nan=math.inf)
    return float(diff.max()) if diff.size else 0.0
