"""Calibration: batches of model inputs, one pass over them that fills each unit's statistics (hooks on the unit's
taps, padding left out), and the targets fitted from those statistics."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .statistics import Request, Statistics
from .targets import LinearTarget
from .units import Unit, dummy_inputs


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


#: Bytes of fp64 sums gathered in one pass by :func:`collect_statistics`; units whose sums do not fit take more passes
#: (:func:`~hf_layercollapse.plan_collapse` measures and drops each pass's units before the next pass).
STATISTICS_MEMORY = 4 * 2**30


def _merged_requests(requests: Iterable[Request]) -> list[Request]:
    """``requests`` without those another one serves (a gate fit's sums also give the mean)."""
    unique = list(dict.fromkeys(requests))
    return [r for r in unique if not any(o is not r and r.served_by(o) for o in unique)]


def _served(request: Request, stats: Mapping[Request, Statistics]) -> Statistics:
    return next(s for r, s in stats.items() if request.served_by(r))


def statistics_passes(model: nn.Module, requests: Mapping[Unit, Iterable[Request]],
                      memory: int = STATISTICS_MEMORY) -> list[list[Unit]]:
    """The units in groups whose fp64 sums fit in ``memory`` bytes: one calibration pass per group (a gated block's
    gate fit grows with the square of its intermediate size: about 2 GB for a Llama-7B block)."""
    groups: list[list[Unit]] = []
    used = 0
    for unit, wanted in requests.items():
        dims = unit.layout.dims(unit.owner(model))
        size = 8 * sum(r.values(dims) for r in _merged_requests(wanted))
        if not groups or used + size > memory:
            groups.append([])
            used = 0
        groups[-1].append(unit)
        used += size
    return groups


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


def _mask_keys(model: nn.Module, units: Iterable[Unit]) -> dict[str, str]:
    """The batch key of each unit's padding mask: ``decoder_attention_mask`` for the decoder units of an
    encoder-decoder model (its ``attention_mask`` belongs to the encoder's tokens), else ``attention_mask``."""
    decoder = None
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
    inside = {id(m) for m in decoder.modules()} if isinstance(decoder, nn.Module) else set()
    return {u.name: "decoder_attention_mask" if id(u.owner(model)) in inside else "attention_mask" for u in units}


def collect_statistics(model: nn.Module, requests: Mapping[Unit, Iterable[Request]], batches: Iterable[dict],
                       progress: Iterator | None = None,
                       memory: int = STATISTICS_MEMORY) -> dict[str, dict[Request, Statistics]]:
    """Fill, over ``batches`` (padding excluded), the statistics each unit's ``requests`` ask for, keyed by unit name
    and request (a request served by another's accumulator maps to it); as many passes over the batches as
    :func:`statistics_passes` says (one, unless the sums of all units would exceed ``memory`` bytes)."""
    batches = list(batches)
    stats: dict[str, dict[Request, Statistics]] = {}
    for group in statistics_passes(model, requests, memory):
        stats.update(_collect(model, {u: requests[u] for u in group}, batches, progress))
    return stats


@torch.no_grad()
def _collect(model: nn.Module, requests: Mapping[Unit, Iterable[Request]], batches: list[dict],
             progress: Iterator | None) -> dict[str, dict[Request, Statistics]]:
    result: dict[str, dict[Request, Statistics]] = {}
    handles, current = [], {}
    mask_keys = _mask_keys(model, requests)
    for unit, wanted in requests.items():
        owner, layout = unit.owner(model), unit.layout
        device = owner.get_submodule(layout.output).weight.device
        dims = layout.dims(owner)
        accumulators = {r: r.make(dims, device) for r in _merged_requests(wanted)}
        result[unit.name] = {r: _served(r, accumulators) for r in dict.fromkeys(wanted)}
        taps = layout.taps()
        order = list(taps)
        stash: dict[str, torch.Tensor] = {}
        due: dict[str, list[Statistics]] = {}  # each accumulator updates when the last of its taps is read
        for accumulator in accumulators.values():
            due.setdefault(max(accumulator.taps, key=order.index), []).append(accumulator)
        for name in dict.fromkeys(t for a in accumulators.values() for t in a.taps):
            tap = taps[name]

            def read(module, args, output=None, tap=tap, name=name, s=stash, due=due, key=mask_keys[unit.name]):
                s[name] = tensor = tap.read(args, output)
                for accumulator in due.get(name, ()):
                    accumulator.update(_mask_for(current, tensor, key), **{t: s[t] for t in accumulator.taps})

            module = owner.get_submodule(tap.path)
            handles.append(module.register_forward_hook(read) if tap.post else module.register_forward_pre_hook(read))
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
    return result


def fit_targets(model: nn.Module, targets: Mapping[Unit, LinearTarget], calibration_data=None,
                example_inputs: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Each unit's target tensors fitted on ``calibration_data`` (else on ``example_inputs`` or the tracer's dummy
    inputs: enough for the mean gate, a rough start that training refines), keyed by unit name, in the model's
    floating-point dtype. Targets with nothing to fit get ``{}``."""
    requests = {u: t.requests(u.layout) for u, t in targets.items() if t.requests(u.layout)}
    fitted: dict[str, dict[str, torch.Tensor]] = {u.name: {} for u in targets}
    if not requests:
        return fitted
    if calibration_data is not None:
        batches = calibration_batches(calibration_data, model)
    else:
        batches = [example_inputs if example_inputs is not None else dummy_inputs(model)]
    stats = collect_statistics(model, requests, batches)
    missing = [u.name for u in requests if not next(iter(stats[u.name].values())).count]
    if missing:
        raise ValueError(f"The calibration data never reached the blocks {missing}.")
    for unit in requests:
        owner = unit.owner(model)
        weight = owner.get_submodule(unit.layout.output).weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32  # quantised weights (4-bit, int8)
        tensors = targets[unit].solve(unit.layout, owner, stats[unit.name])
        fitted[unit.name] = {k: v.to(dtype) for k, v in tensors.items()}
    return fitted
