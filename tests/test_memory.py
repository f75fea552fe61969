"""estimate_memory: the tensors the method adds, counted before injection, against what injection and training
allocate."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs, tiny_model

import hf_layercollapse as hlc
from hf_layercollapse.calibration import collect_statistics
from hf_layercollapse.inject import selected_units
from hf_layercollapse.targets import target_for


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]  # a fitted line's slope and offset are buffers


def _added(model: torch.nn.Module, before: set[int]) -> list[torch.Tensor]:
    return [t for t in _tensors(model) if id(t) not in before]


def _statistics_bytes(model, config, batches) -> int:
    units, _ = selected_units(model, config)
    requests = {u: target_for(u.layout, config.linear_target, config.activation).requests(u.layout) for u in units}
    stats = collect_statistics(model, {u: r for u, r in requests.items() if r}, batches)
    tensors = {id(t): t for per_unit in stats.values() for s in per_unit.values() for t in vars(s).values()
               if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("name, target", [("bert", "default"), ("bert", "affine"), ("bert", "fitted"),
                                          ("llama", "default"), ("llama", "affine")])
def test_the_estimate_counts_what_injection_and_training_allocate(name, target):
    model = tiny_model(name)
    config = hlc.LayerCollapseConfig(linear_target=target)
    batches = [make_inputs(model, seed=s) for s in range(2)]
    estimate = hlc.estimate_memory(model, config)
    before = {id(t) for t in _tensors(model)}
    statistics = _statistics_bytes(model, config, batches)  # the default gated target fits its mean gate too
    hlc.get_collapse_model(model, config, calibration_data=batches if target != "default" else None)
    added = _added(model, before)
    assert estimate.added_parameters == sum(p.numel() for p in added)
    assert estimate.trainable_parameters == sum(p.numel() for p in added if p.requires_grad)
    assert len(estimate.units) == len(hlc.injected_activations(model))
    optimizer = torch.optim.AdamW([p for p in added if p.requires_grad], lr=1e-3)
    hlc.regularization_loss(model).backward()
    for p in added:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert estimate.optimizer_bytes == states
    assert estimate.gradient_bytes == sum(p.grad.numel() * p.grad.element_size() for p in added if p.requires_grad)
    assert estimate.statistics_bytes == statistics


def test_calibration_passes_under_a_budget_lower_the_peak():
    model = tiny_model("llama")
    config = hlc.LayerCollapseConfig(linear_target="affine")
    whole = hlc.estimate_memory(model, config)
    per_block = whole.statistics_bytes // len(whole.units)
    assert hlc.estimate_memory(model, config, statistics_memory=per_block).statistics_bytes == per_block
    assert "calibration statistics" in str(whole) and whole.to_dict()["units"] == len(whole.units)
