"""The architecture × target × path grid, in the style of PEFT's ``TEST_CASES``: every tiny architecture of the grid
with every linear target it can have, through the same testers — injection, a mid-training checkpoint, collapsing,
the collapsed checkpoint, and (for the targets offered through PEFT) ``get_peft_model`` → ``merge_and_unload``.

Every tester compares numbers: outputs, parameter counts counted on the modules, α and target tensors.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import (
    GATED,
    GATED_ARCHS,
    PLAIN,
    gated_model,
    make_inputs,
    max_abs_diff,
    max_rel_diff,
    num_params,
    outputs,
    set_alphas,
    tiny_model,
)
from peft import get_peft_model
from transformers import AutoModel
from transformers.pytorch_utils import Conv1D

import hf_layercollapse as hlc

#: target → the config that selects it (activation and linear_target), and whether PEFT offers it
TARGETS = {
    "identity": ({}, True),
    "prelu": ({"activation": "prelu"}, True),
    "line": ({"linear_target": "fitted"}, True),
    "mean_gate": ({}, True),
    "fitted_gate": ({"linear_target": "fitted"}, True),
    "affine": ({"linear_target": "affine"}, False),
    "low_rank_affine": ({"linear_target": "affine", "affine_rank": 3}, True),
}
PLAIN_TARGETS = ("identity", "prelu", "line", "affine", "low_rank_affine")
GATED_TARGETS = ("mean_gate", "fitted_gate", "affine", "low_rank_affine")
GATED_EXTRA = [name for name in GATED_ARCHS if name not in GATED]  # qwen2, gemma, phi3 (fused gate_up_proj)

#: (architecture, target): every plain architecture with every plain target, every gated one with every gated target
TEST_CASES = ([(name, target) for name in PLAIN for target in PLAIN_TARGETS]
              + [(name, target) for name in GATED_ARCHS for target in GATED_TARGETS])
#: the heavier paths (checkpoints, PEFT) on one architecture of each family of the grid
SAVE_CASES = [(n, t) for n, t in TEST_CASES if n in {"bert", "gpt2", "t5", "vit", "whisper", "llama", "phi3",
                                                     "t5-gated"}]
PEFT_CASES = [(n, t) for n, t in SAVE_CASES if TARGETS[t][1]]


def build(name: str) -> torch.nn.Module:
    return gated_model(name) if name in GATED_EXTRA else tiny_model(name)


def calibration(model) -> list[dict[str, torch.Tensor]]:
    """Enough tokens for a well-posed fit of the affine maps (4 batches), padding in the first."""
    batches = []
    for seed in range(4):
        batch = make_inputs(model, seed=seed + 1)
        batches.append({k: torch.cat([v] * 4) for k, v in batch.items()})
    if "attention_mask" in batches[0]:
        batches[0]["attention_mask"][0, -2:] = 0
    return batches


def config_of(target: str) -> hlc.LayerCollapseConfig:
    return hlc.LayerCollapseConfig(**TARGETS[target][0])


def inject(name: str, target: str) -> tuple[torch.nn.Module, torch.nn.Module, list]:
    """(the original model, the injected copy, the calibration batches)."""
    original = build(name)
    batches = calibration(original)
    model = hlc.get_collapse_model(copy.deepcopy(original), config_of(target), calibration_data=batches)
    return original, model, batches


def expected_saving(original: torch.nn.Module, target: str) -> int:
    """Parameters that merging every block saves, counted on the original modules: each block's projections minus
    one d_in × d_out map (and its bias: the fitted line and the affine map always bring one; otherwise a bias of a
    projection, or GPT-2's Conv1D, which always has one)."""
    saved = 0
    for unit in hlc.find_mlp_blocks(original):
        owner = unit.owner(original)
        modules = [owner.get_submodule(p) for p in dict.fromkeys((*unit.layout.inputs, unit.layout.output))]
        before = sum(p.numel() for m in modules for p in m.parameters(recurse=False))
        first, last = owner.get_submodule(unit.layout.input), owner.get_submodule(unit.layout.output)
        d_in = first.weight.shape[0] if isinstance(first, Conv1D) else first.in_features
        d_out = last.weight.shape[1] if isinstance(last, Conv1D) else last.out_features
        bias = target in ("line", "affine", "low_rank_affine") or isinstance(last, Conv1D) or any(
            m.bias is not None for m in (first, last))
        saved += before - (d_in * d_out + (d_out if bias else 0))
    return saved


# ----------------------------------------------------------------------------------------------- testers


@pytest.mark.parametrize(("name", "target"), TEST_CASES)
def test_injection_is_exact_and_adds_alpha_and_the_targets_tensors(name, target):
    original, model, _ = inject(name, target)
    inputs = make_inputs(model)
    acts = hlc.injected_activations(model)
    units = hlc.find_mlp_blocks(original)
    assert list(acts) == [u.name for u in units] and {a.target.name for a in acts.values()} == {
        {"mean_gate": "gate_constant", "fitted_gate": "gate_constant"}.get(target, target)}
    added = sum(1 + sum(t.numel() for k, t in a.target_tensors().items() if a.target.trainable_tensor(k))
                for a in acts.values())
    buffers = sum(t.numel() for a in acts.values() for k, t in a.target_tensors().items()
                  if not a.target.trainable_tensor(k))
    assert num_params(model) == num_params(original) + added
    assert sum(b.numel() for b in model.buffers()) == sum(b.numel() for b in original.buffers()) + buffers
    difference = max_abs_diff(outputs(model, inputs), outputs(original, inputs))
    if target == "prelu":
        assert difference > 1e-4  # the paper's PReLU replaces the activation (a ReLU at α ≈ 0)
    else:
        assert difference <= 1e-6  # α = 0: the original model


@pytest.mark.parametrize(("name", "target"), TEST_CASES)
def test_collapse_at_alpha_one_is_exact_and_saves_the_counted_parameters(name, target):
    original, model, _ = inject(name, target)
    inputs = make_inputs(model)
    set_alphas(model, 1.0)
    linear = outputs(model, inputs)
    report = hlc.collapse_model(model)
    assert [b.status for b in report.blocks] == ["collapsed"] * len(hlc.find_mlp_blocks(original))
    assert max_rel_diff(outputs(model, inputs), linear) <= 1e-5
    assert num_params(original) - num_params(model) == expected_saving(original, target) == report.params_saved
    assert report.model_params_before == num_params(original) and not hlc.injected_activations(model)
    assert hlc.find_mlp_blocks(model, method="trace") == []  # nothing left to find: every block is one projection
    assert {row.kind for row in report.blocks} == {"gated" if name in GATED_ARCHS else "plain"}


@pytest.mark.parametrize(("name", "target"), SAVE_CASES)
def test_checkpoints_mid_training_and_collapsed_reload_exactly(name, target, tmp_path):
    _, model, _ = inject(name, target)
    inputs = make_inputs(model)
    values = [0.15 + 0.2 * i for i in range(len(hlc.injected_activations(model)))]
    set_alphas(model, *values)
    with torch.no_grad():  # trained targets: moved from their start (a low-rank correction starts at zero)
        for act in hlc.injected_activations(model).values():
            for key in act.target.trainable_names:
                act.target_tensors()[key].add_(0.01)
    blended = outputs(model, inputs)
    model.save_pretrained(tmp_path / "injected")
    record = json.loads((tmp_path / "injected" / "config.json").read_text())["layercollapse"]
    # the oldest format that holds it
    assert record["format"] == {"line": 2, "affine": 3, "low_rank_affine": 4}.get(target, 1)
    loaded = AutoModel.from_pretrained(tmp_path / "injected").eval()
    acts, twins = hlc.injected_activations(model), hlc.injected_activations(loaded)
    assert list(twins) == list(acts)
    for act, twin in zip(acts.values(), twins.values()):
        assert twin.target == act.target and twin.layout == act.layout
        assert twin.alpha_value == pytest.approx(act.alpha_value)
        for key, tensor in act.target_tensors().items():
            assert torch.equal(twin.target_tensors()[key], tensor), key
    assert max_abs_diff(outputs(loaded, inputs), blended) <= 1e-6
    hlc.regularization_loss(loaded).backward()  # training goes on: α still pulls towards 1
    assert all(a.alpha.grad.item() < 0 for a in twins.values())

    set_alphas(model, 1.0)
    hlc.collapse_model(model)
    collapsed = outputs(model, inputs)
    model.save_pretrained(tmp_path / "collapsed")
    assert json.loads((tmp_path / "collapsed" / "config.json").read_text())["layercollapse"]["format"] == 1
    reloaded = AutoModel.from_pretrained(tmp_path / "collapsed").eval()
    assert num_params(reloaded) == num_params(model)
    assert max_abs_diff(outputs(reloaded, inputs), collapsed) <= 1e-6


@pytest.mark.parametrize(("name", "target"), PEFT_CASES)
def test_peft_merge_and_unload_equals_collapse_model(name, target, tmp_path):
    """The same targets through PEFT: at α = 0 the original model; with the same α and targets, merge_and_unload
    gives collapse_model's weights, report and record, and the merged checkpoint reloads."""
    original, reference, batches = inject(name, target)
    inputs = make_inputs(original)
    peft_model = get_peft_model(copy.deepcopy(original), config_of(target))
    if any(a.target.requests(a.layout) for a in hlc.injected_activations(peft_model).values()):
        hlc.calibrate_linear_targets(peft_model, batches)
    if target != "prelu":
        assert max_abs_diff(outputs(peft_model, inputs), outputs(original, inputs)) == 0.0
    ours, theirs = hlc.injected_activations(peft_model), hlc.injected_activations(reference)
    for layer, act in zip(ours.values(), theirs.values()):  # the same targets, fitted on the base model
        for key, tensor in act.target_tensors().items():
            torch.testing.assert_close(layer.target_tensors()[key], tensor, rtol=0, atol=0)
    alphas = [1.0 if i % 2 == 0 else 0.6 for i in range(len(ours))]  # every other block stays injected
    set_alphas(peft_model, *alphas)
    set_alphas(reference, *alphas)
    with torch.no_grad():
        for layer, act in zip(ours.values(), theirs.values()):  # trained targets: moved the same way
            for key in act.target.trainable_names:
                act.target_tensors()[key].mul_(1.1).add_(0.01)
                layer.target_tensors()[key].mul_(1.1).add_(0.01)
    wrapped = outputs(peft_model, inputs)
    with peft_model.disable_adapter():
        assert max_abs_diff(outputs(peft_model, inputs), outputs(original, inputs)) == 0.0
    report = hlc.collapse_model(reference)
    merged = peft_model.merge_and_unload()
    assert peft_model.base_model.collapse_report.to_dict() == report.to_dict()
    assert merged.config.layercollapse["blocks"] == reference.config.layercollapse["blocks"]
    expected = reference.state_dict()
    assert merged.state_dict().keys() == expected.keys()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    assert max_rel_diff(outputs(merged, inputs), wrapped) < 1e-5
    merged.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert max_abs_diff(outputs(loaded, inputs), outputs(merged, inputs)) < 1e-6
    assert [a.alpha_value for a in hlc.injected_activations(loaded).values()] == pytest.approx(
        [a for a in alphas if a < 1.0])  # the trained α of the blocks left injected
