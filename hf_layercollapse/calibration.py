"""Calibration data for collapsing without fine-tuning: batching, per-block input/output statistics, and the
least-squares affine fit of a block."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import BlockKind, MLPBlock, projection_shape


def calibration_batches(data, model: nn.Module, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """The calibration data as a list of batches of tensors on the model's device.

    ``data`` is a ``datasets.Dataset`` (batched with ``transformers.default_data_collator``: pad it to a fixed
    length), a ``torch.utils.data.DataLoader`` or any iterable of dict batches. Raises ValueError when it is
    empty or its batches lack every input the model's ``forward`` accepts.
    """
    from transformers import default_data_collator

    if hasattr(data, "column_names") and hasattr(data, "select"):  # datasets.Dataset
        accepted = set(inspect.signature(model.forward).parameters)
        columns = [c for c in data.column_names if c in accepted]
        rows = [{c: row[c] for c in columns} for row in data]
        data = [default_data_collator(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    device = next(model.parameters()).device
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(b).items()} for b in data]
    if not batches:
        raise ValueError("The calibration data is empty: pass a dataset or at least one batch.")
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    for i, batch in enumerate(batches):
        if main not in batch and not any(k in params for k in batch if k != "labels"):
            raise ValueError(
                f"Calibration batch {i} has keys {sorted(batch)} but {type(model).__name__}.forward needs "
                f"{main!r} (it accepts {sorted(k for k in params if k != 'kwargs')[:8]}): tokenize or process the "
                "data first."
            )
    return batches


#: Bytes of fp64 sums gathered in one pass by :func:`collect_statistics`; more blocks than fit take more passes
#: (:func:`~hf_layercollapse.plan_collapse` measures and drops each pass's blocks before the next pass).
STATISTICS_MEMORY = 4 * 2**30


def _tokens(mask: torch.Tensor | None, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` as fp64 ``[tokens, features]`` matrices, padding tokens (``mask == 0``) left out."""
    flat = [t.reshape(-1, t.shape[-1]).to(torch.float64) for t in tensors]
    if mask is not None and mask.numel() == flat[0].shape[0]:
        keep = mask.reshape(-1).bool()
        flat = [t[keep] for t in flat]
    return flat


class LeastSquaresStats:
    """Streaming sums ``XᵀWX`` and ``XᵀWY`` (fp64) of a block's inputs X (with a column of ones) and outputs Y.

    ``relative=False``: every token weighs the same (W = I). ``relative=True``: a token weighs ``1/mean(yₜ²)``, so
    each token's error counts relative to the size of its output and the few tokens with huge activations (the
    first position of a sequence in most LLMs) do not decide the fit; on the real SmolLM2-135M the plain fit was
    catastrophic on blocks 11 and 28 (held-out perplexity 45 → 319 and 396), the relative one was not (124, 50).
    """

    def __init__(self, d_in: int, d_out: int, device: torch.device, relative: bool = False) -> None:
        self.gram = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64, device=device)
        self.cross = torch.zeros(d_in + 1, d_out, dtype=torch.float64, device=device)
        self.count = 0
        self.relative = relative

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor | None) -> None:
        x, y = _tokens(mask, inputs, outputs)
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        weighted = x / y.pow(2).mean(1, keepdim=True).clamp(min=1e-12) if self.relative else x
        self.gram += weighted.T @ x
        self.cross += weighted.T @ y
        self.count += x.shape[0]

    def solve(self, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [out, in], bias [out])`` minimising ``‖XWᵀ + b − Y‖²`` (weighted when relative)
        ``+ ridge·mean(diag XᵀX)·‖W‖²``."""
        if self.count == 0:
            raise ValueError("No calibration tokens reached this block.")
        d = self.gram.shape[0] - 1
        scale = self.gram.diagonal()[:d].mean().clamp(min=1e-12)
        regulariser = torch.zeros_like(self.gram)
        regulariser.diagonal()[:d] = ridge * scale
        solution = torch.linalg.solve(self.gram + regulariser, self.cross)  # [(d+1), out]
        return solution[:d].T.contiguous(), solution[d].contiguous()


class GateStats:
    """Streaming sums (fp64) over a gated block's tokens of its gate activations ``g = act(gate(x))``, up
    projections ``u = up(x)`` and outputs ``y``: ``Σ g``, ``Σ wₜ uuᵀ`` and ``Σ wₜ u(g⊙u)ᵀ`` with ``wₜ = 1/mean(yₜ²)``.
    Enough for the two constant gates ``c`` that make the block ``down(c ⊙ up(x))`` a single linear map: the mean
    of ``g``, and the ``c`` whose block output is closest to the original in relative squared error (:meth:`fit`)."""

    def __init__(self, channels: int, device: torch.device, fit: bool = True) -> None:
        self.gate_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        # the sums for :meth:`fit` (channels² each): only when asked for
        self.up_gram = torch.zeros(channels, channels, dtype=torch.float64, device=device) if fit else None
        self.up_cross = torch.zeros(channels, channels, dtype=torch.float64, device=device) if fit else None
        self.count = 0

    def update(self, gate: torch.Tensor, up: torch.Tensor, output: torch.Tensor, mask: torch.Tensor | None) -> None:
        g, u, y = _tokens(mask, gate, up, output)
        self.gate_sum += g.sum(0)
        self.count += g.shape[0]
        if self.up_gram is not None:
            weighted = u / y.pow(2).mean(1, keepdim=True).clamp(min=1e-12)
            self.up_gram += weighted.T @ u
            self.up_cross += weighted.T @ (g * u)

    def _check(self) -> None:
        if self.count == 0:
            raise ValueError("No calibration tokens reached this gated block.")

    def mean(self) -> torch.Tensor:
        """Per-channel mean of ``act(gate(x))``."""
        self._check()
        return self.gate_sum / self.count

    def fit(self, down_weight: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
        """The ``c`` minimising ``Σₜ ‖W_down·(c ⊙ uₜ) − W_down·(gₜ ⊙ uₜ)‖² / mean(yₜ²) + ridge·mean(diag G)·‖c‖²``.

        Each token's error counts relative to the size of its output, so the few tokens with huge activations (the
        first position of a sequence in most LLMs) do not decide the fit: measured on the real SmolLM2-135M, the
        plain squared-error fit was catastrophic on some blocks (block 11 alone: held-out perplexity 45 → 410,000;
        relative: 150; the mean: 162). The output is linear in ``c``, so the normal equations are ``G c = r`` with
        the Hadamard products ``G = (W_downᵀW_down) ∘ Σ wuuᵀ`` and ``r = rowsum((W_downᵀW_down) ∘ Σ wu(g⊙u)ᵀ)``: one
        unknown per intermediate channel, and ``g``'s correlation with ``u``, which the mean ignores, is used.
        """
        self._check()
        if self.up_gram is None:
            raise ValueError("These gate statistics were collected without the sums for the fit (fit=False).")
        w = down_weight.detach().to(self.up_gram.device, torch.float64)
        products = w.T @ w
        gram = products * self.up_gram
        rhs = products.mul_(self.up_cross).sum(1)  # in place: one channels² temporary fewer
        gram.diagonal().add_(ridge * gram.diagonal().mean().clamp(min=1e-12))
        return torch.linalg.solve(gram, rhs)


class LineStats:
    """Streaming per-channel sums (fp64) of a plain block's activation inputs ``z`` and outputs ``act(z)``: enough for
    the least-squares line ``act(z) ≈ a·z + b`` of every intermediate channel (:meth:`solve`)."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.sums = torch.zeros(5, channels, dtype=torch.float64, device=device)  # Σz, Σact, Σz², Σz·act, count

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor | None) -> None:
        z, g = _tokens(mask, inputs, outputs)
        count = torch.full((z.shape[1],), float(z.shape[0]), dtype=z.dtype, device=z.device)
        self.sums += torch.stack([z.sum(0), g.sum(0), (z * z).sum(0), (z * g).sum(0), count])

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slope, offset)`` per channel; a channel whose input never varied gets slope 0 and its mean output."""
        z, g, zz, zg, count = self.sums
        if not count.any():
            raise ValueError("No calibration tokens reached this block.")
        mean_z, mean_g = z / count, g / count
        variance = zz / count - mean_z**2
        slope = torch.where(variance > 1e-12, (zg / count - mean_z * mean_g) / variance.clamp(min=1e-12), 0.0)
        return slope, mean_g - slope * mean_z


@dataclass
class BlockStats:
    """What one calibration pass gathered for a block: the least-squares sums, plain and relative (when asked for),
    for a gated block its gate statistics, and for a plain block its activation's line (when asked for)."""

    least_squares: LeastSquaresStats | None = None
    relative_least_squares: LeastSquaresStats | None = None
    gate: GateStats | None = None
    line: LineStats | None = None


def _mask_for(batch: dict, inputs: torch.Tensor, key: str = "attention_mask") -> torch.Tensor | None:
    """The batch's padding mask when it matches the tokens of ``inputs``: ``[batch, seq, features]``, or the
    ``[batch·seq, features]`` that some models (OPT) flatten their MLP inputs to."""
    mask = batch.get(key)
    if not isinstance(mask, torch.Tensor):
        return None
    if inputs.dim() == 3 and mask.shape == inputs.shape[:2]:
        return mask
    if inputs.dim() == 2 and mask.dim() == 2 and mask.numel() == inputs.shape[0]:
        return mask
    return None


def _mask_keys(model: nn.Module, blocks: list[MLPBlock]) -> dict[str, str]:
    """The batch key of each block's padding mask: ``decoder_attention_mask`` for the decoder blocks of an
    encoder-decoder model (its ``attention_mask`` belongs to the encoder's tokens), else ``attention_mask``."""
    decoder = None
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
    inside = {id(m) for m in decoder.modules()} if isinstance(decoder, nn.Module) else set()
    return {b.name: "decoder_attention_mask" if id(model.get_submodule(b.path("fc1"))) in inside else "attention_mask"
            for b in blocks}


def _up_half(block: MLPBlock, output: torch.Tensor) -> torch.Tensor:
    """The up projection's output (the second half of a fused ``gate_up_proj``)."""
    if block.layout.gate == block.layout.fc1:
        return output[..., output.shape[-1] // 2:]
    return output


def _statistics_bytes(model: nn.Module, block: MLPBlock, least_squares: bool | str, gate_fit: bool) -> int:
    d_in = projection_shape(model.get_submodule(block.path("fc1")))[0]
    channels, d_out = projection_shape(model.get_submodule(block.path("fc2")))
    values = (2 if least_squares is True else 1 if least_squares else 0) * (d_in + 1) * (d_in + 1 + d_out)
    values += 5 * channels  # gate mean or line sums
    if block.kind is BlockKind.GATED and gate_fit:
        values += 2 * channels * channels
    return 8 * values


def statistics_passes(model: nn.Module, blocks: list[MLPBlock], least_squares: bool | str = True,
                      gate_fit: bool = True, memory: int = STATISTICS_MEMORY) -> list[list[MLPBlock]]:
    """``blocks`` in groups whose fp64 sums fit in ``memory`` bytes: one calibration pass per group (a gated
    block's gate statistics grow with the square of its intermediate size: about 2 GB for a Llama-7B block, plus
    two more channels² temporaries while :meth:`GateStats.fit` solves)."""
    groups: list[list[MLPBlock]] = []
    used = 0
    for block in blocks:
        size = _statistics_bytes(model, block, least_squares, gate_fit)
        if not groups or used + size > memory:
            groups.append([])
            used = 0
        groups[-1].append(block)
        used += size
    return groups


def collect_statistics(model: nn.Module, blocks: list[MLPBlock], batches: Iterable[dict],
                       progress: Iterator | None = None, least_squares: bool | str = True, gate_fit: bool = True,
                       lines: bool = False, memory: int = STATISTICS_MEMORY) -> dict[str, BlockStats]:
    """Accumulate, over ``batches`` (padding excluded), each block's least-squares statistics, plain and relative
    (unless ``least_squares=False``; only the relative ones with ``"relative"``), each gated block's
    :class:`GateStats` (with the sums for its fit unless ``gate_fit=False``) and, with ``lines=True``, each plain
    block's :class:`LineStats`; as many passes over the batches as :func:`statistics_passes` says (one, unless the
    sums of all blocks would exceed ``memory`` bytes)."""
    batches = list(batches)
    stats: dict[str, BlockStats] = {}
    for group in statistics_passes(model, blocks, least_squares, gate_fit, memory):
        stats.update(_collect(model, group, batches, progress, least_squares, gate_fit, lines))
    return stats


@torch.no_grad()
def _collect(model: nn.Module, blocks: list[MLPBlock], batches: list[dict], progress: Iterator | None,
             least_squares: bool | str, gate_fit: bool, lines: bool) -> dict[str, BlockStats]:
    stats: dict[str, BlockStats] = {}
    handles, current = [], {}
    mask_keys = _mask_keys(model, blocks)
    for block in blocks:
        fc1, fc2 = model.get_submodule(block.path("fc1")), model.get_submodule(block.path("fc2"))
        d_in, d_out = projection_shape(fc1)[0], projection_shape(fc2)[1]
        entry = stats[block.name] = BlockStats()
        key = mask_keys[block.name]
        stash: dict[str, torch.Tensor] = {}
        if least_squares:
            if least_squares is True:
                entry.least_squares = LeastSquaresStats(d_in, d_out, fc1.weight.device)
            entry.relative_least_squares = LeastSquaresStats(d_in, d_out, fc1.weight.device, relative=True)
            handles.append(fc1.register_forward_pre_hook(lambda m, args, s=stash: s.__setitem__("x", args[0])))

            def record(module, args, output, s=stash, e=entry, k=key):
                mask = _mask_for(current, s["x"], k)
                if e.least_squares is not None:
                    e.least_squares.update(s["x"], output, mask)
                e.relative_least_squares.update(s["x"], output, mask)

            handles.append(fc2.register_forward_hook(record))
        if block.kind is BlockKind.GATED:
            entry.gate = GateStats(projection_shape(fc2)[0], fc1.weight.device, fit=gate_fit)
            act = model.get_submodule(block.path("act"))
            handles.append(act.register_forward_hook(lambda m, args, out, s=stash: s.__setitem__("gate", out)))
            handles.append(fc1.register_forward_hook(
                lambda m, args, out, s=stash, b=block: s.__setitem__("up", _up_half(b, out))))

            def record_gate(module, args, output, s=stash, e=entry, k=key):  # gate and up of this call are known
                e.gate.update(s["gate"], s["up"], output, _mask_for(current, s["up"], k))

            handles.append(fc2.register_forward_hook(record_gate))
        elif lines:
            entry.line = LineStats(projection_shape(fc1)[1], fc1.weight.device)
            act = model.get_submodule(block.path("act"))
            handles.append(act.register_forward_hook(
                lambda m, args, out, e=entry, k=key: e.line.update(args[0], out, _mask_for(current, args[0], k))))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current.clear()
            current.update(batch)
            model(**{k: v for k, v in batch.items() if k != "labels"})
            if progress is not None:
                progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats


@contextmanager
def replaced_blocks(model: nn.Module, replacements: dict[MLPBlock, nn.Module]):
    """Temporarily compute each block as ``replacement(x)`` of its input ``x`` (hooks; the model is unchanged)."""
    handles = []
    for block, merged in replacements.items():
        fc1, fc2 = model.get_submodule(block.path("fc1")), model.get_submodule(block.path("fc2"))
        stash: dict[str, torch.Tensor] = {}
        handles.append(fc1.register_forward_pre_hook(lambda m, args, s=stash: s.__setitem__("x", args[0])))
        handles.append(fc2.register_forward_hook(lambda m, args, out, s=stash, f=merged: f(s["x"]).to(out.dtype)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def gate_constants(model: nn.Module, blocks: list[MLPBlock], calibration_data=None,
                   example_inputs: dict[str, torch.Tensor] | None = None, method: str = "mean",
                   ridge: float = 1e-4) -> dict[str, torch.Tensor]:
    """The constant gate ``c`` of each gated block, keyed by block name: the per-channel mean of ``act(gate(x))``
    (``method="mean"``) or the least-squares fit of the block's output (``"least_squares"``, :meth:`GateStats.fit`)
    over the calibration data (padding excluded), else over ``example_inputs`` or the tracer's dummy inputs."""
    if method not in ("mean", "least_squares"):
        raise ValueError(f"gate constant method {method!r}: use 'mean' or 'least_squares'.")
    if not blocks:
        return {}
    if calibration_data is not None:
        batches = calibration_batches(calibration_data, model)
    else:
        from .tracing import dummy_inputs

        batches = [example_inputs if example_inputs is not None else dummy_inputs(model)]
    stats = collect_statistics(model, blocks, batches, least_squares=False, gate_fit=method == "least_squares")
    missing = [b.name for b in blocks if not stats[b.name].gate.count]
    if missing:
        raise ValueError(f"The calibration data never reached the gated blocks {missing}.")
    weight = model.get_submodule(blocks[0].path("fc2")).weight
    dtype = weight.dtype if weight.is_floating_point() else torch.float32  # quantised weights (4-bit, int8)
    constants = {}
    for block in blocks:
        gate = stats[block.name].gate
        if method == "mean":
            constants[block.name] = gate.mean().to(dtype)
        else:
            down = model.get_submodule(block.path("fc2"))
            constants[block.name] = gate.fit(linear_weight(down), ridge).to(dtype)
    return constants


def linear_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` weight of a Linear or GPT-2 Conv1D (dequantised weights are not supported here)."""
    if not module.weight.is_floating_point():
        raise ValueError(f"{type(module).__name__} has quantised weights: fit the gate constants on a "
                         "floating-point copy of the model, or use the mean.")
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def activation_lines(model: nn.Module, blocks: list[MLPBlock], calibration_data) -> dict[str, tuple[torch.Tensor,
                                                                                                 torch.Tensor]]:
    """``(slope, offset)`` of the per-channel least-squares line ``act(z) ≈ slope·z + offset`` of each plain block's
    activation over the calibration data (padding excluded), keyed by block name, in the model's dtype."""
    if not blocks:
        return {}
    stats = collect_statistics(model, blocks, calibration_batches(calibration_data, model), least_squares=False,
                               gate_fit=False, lines=True)
    dtype = model.get_submodule(blocks[0].path("fc1")).weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    return {b.name: tuple(t.to(dtype) for t in stats[b.name].line.solve()) for b in blocks}


def affine_targets(model: nn.Module, blocks: list[MLPBlock], calibration_data,
                   ridge: float = 1e-4) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(weight [out, in], bias [out])`` of each block's affine map closest to the block's output over the
    calibration data (padding excluded; relative least squares, :class:`LeastSquaresStats`), keyed by block name,
    in the model's dtype: the target of ``linear_target="affine"``. Each token's error counts relative to the size
    of its output, the planner's fit that was not catastrophic on the real SmolLM2-135M's blocks."""
    if not blocks:
        return {}
    batches = calibration_batches(calibration_data, model)
    stats = collect_statistics(model, blocks, batches, least_squares="relative", gate_fit=False)
    missing = [b.name for b in blocks if not stats[b.name].relative_least_squares.count]
    if missing:
        raise ValueError(f"The calibration data never reached the blocks {missing}.")
    dtype = model.get_submodule(blocks[0].path("fc2")).weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    return {b.name: tuple(t.to(dtype) for t in stats[b.name].relative_least_squares.solve(ridge)) for b in blocks}
