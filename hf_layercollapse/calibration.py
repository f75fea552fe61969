"""Calibration data for collapsing without fine-tuning: batching, per-block input/output statistics, and the
least-squares affine fit of a block."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .architectures import MLPBlock, projection_shape


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


class LeastSquaresStats:
    """Streaming sums ``XᵀX`` and ``XᵀY`` (fp64) of a block's inputs X (with a column of ones) and outputs Y."""

    def __init__(self, d_in: int, d_out: int, device: torch.device) -> None:
        self.gram = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64, device=device)
        self.cross = torch.zeros(d_in + 1, d_out, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
        y = outputs.reshape(-1, outputs.shape[-1]).to(torch.float64)
        if mask is not None and mask.numel() == x.shape[0]:
            keep = mask.reshape(-1).bool()
            x, y = x[keep], y[keep]
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.count += x.shape[0]

    def solve(self, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [out, in], bias [out])`` minimising ``‖XWᵀ + b − Y‖² + ridge·mean(diag XᵀX)·‖W‖²``."""
        if self.count == 0:
            raise ValueError("No calibration tokens reached this block.")
        d = self.gram.shape[0] - 1
        scale = self.gram.diagonal()[:d].mean().clamp(min=1e-12)
        regulariser = torch.zeros_like(self.gram)
        regulariser.diagonal()[:d] = ridge * scale
        solution = torch.linalg.solve(self.gram + regulariser, self.cross)  # [(d+1), out]
        return solution[:d].T.contiguous(), solution[d].contiguous()


def _mask_for(batch: dict, inputs: torch.Tensor) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and inputs.dim() == 3 and mask.shape == inputs.shape[:2]:
        return mask
    return None


@torch.no_grad()
def collect_statistics(model: nn.Module, blocks: list[MLPBlock], batches: Iterable[dict],
                       progress: Iterator | None = None) -> dict[str, LeastSquaresStats]:
    """One pass over ``batches`` that accumulates each block's least-squares statistics."""
    stats: dict[str, LeastSquaresStats] = {}
    handles, current = [], {}
    for block in blocks:
        fc1, fc2 = model.get_submodule(block.path("fc1")), model.get_submodule(block.path("fc2"))
        d_in, d_out = projection_shape(fc1)[0], projection_shape(fc2)[1]
        stats[block.name] = LeastSquaresStats(d_in, d_out, fc1.weight.device)
        stash: dict[str, torch.Tensor] = {}
        handles.append(fc1.register_forward_pre_hook(lambda m, args, s=stash: s.__setitem__("x", args[0])))

        def record(module, args, output, s=stash, name=block.name):
            stats[name].update(s["x"], output, _mask_for(current, s["x"]))

        handles.append(fc2.register_forward_hook(record))
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
def gate_means(model: nn.Module, blocks: list[MLPBlock], calibration_data=None,
               example_inputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-channel mean of ``act(gate(x))`` of each gated block over the calibration data (padding excluded),
    else over ``example_inputs`` or the tracer's dummy inputs. Keyed by block name."""
    if not blocks:
        return {}
    if calibration_data is not None:
        batches = calibration_batches(calibration_data, model)
    else:
        from .tracing import dummy_inputs

        batches = [example_inputs if example_inputs is not None else dummy_inputs(model)]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict = {}
    handles = []
    for block in blocks:
        def record(module, args, output, name=block.name):
            values = output.reshape(-1, output.shape[-1]).double()
            mask = _mask_for(current, output)
            if mask is not None:
                values = values[mask.reshape(-1).bool()]
            sums[name] = sums.get(name, 0) + values.sum(0)
            counts[name] = counts.get(name, 0) + values.shape[0]

        handles.append(model.get_submodule(block.path("act")).register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current.clear()
            current.update(batch)
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [b.name for b in blocks if not counts.get(b.name)]
    if missing:
        raise ValueError(f"The calibration data never reached the gated blocks {missing}.")
    weight = model.get_submodule(blocks[0].path("fc2")).weight
    dtype = weight.dtype if weight.is_floating_point() else torch.float32  # quantised weights (4-bit, int8)
    return {name: (sums[name] / counts[name]).to(dtype) for name in sums}
