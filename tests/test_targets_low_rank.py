"""`LayerCollapseConfig(linear_target="affine", affine_rank=r)`: the fitted affine map stays a frozen buffer and a
rank-r correction trains (:class:`~hf_layercollapse.targets.LowRankAffine`), directly and through PEFT / LoRA — saved
in the adapter, merged by ``merge_and_unload``. (The architecture grid of tests/test_matrix.py covers injection,
collapsing and checkpoints of this target on every tiny architecture.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import gated_model, make_inputs, max_abs_diff, max_rel_diff, outputs, set_alphas, tiny_model, training_args
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

import hf_layercollapse as hlc
from hf_layercollapse.errors import LayerCollapseConfigError
from hf_layercollapse.targets import Affine, LowRankAffine, target_from_record

RANK = 3
LOW_RANK = hlc.LayerCollapseConfig(linear_target="affine", affine_rank=RANK)


def calibration(model, batches: int = 4) -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in range(batches):
        batch = make_inputs(model, seed=seed + 1)
        out.append({k: torch.cat([v] * 4) for k, v in batch.items()})
    return out


@pytest.mark.parametrize("value", [0, -2, 2.5, "4", True])
def test_bad_rank_is_refused_naming_the_field(value):
    with pytest.raises(LayerCollapseConfigError, match=r"affine_rank=.*positive int"):
        hlc.LayerCollapseConfig(linear_target="affine", affine_rank=value)


def test_rank_without_the_affine_target_is_refused():
    with pytest.raises(LayerCollapseConfigError, match=r"affine_rank=4 .* needs linear_target='affine', not 'fitted'"):
        hlc.LayerCollapseConfig(linear_target="fitted", affine_rank=4)


def test_settings_carry_the_rank_only_when_set():
    assert "affine_rank" not in hlc.LayerCollapseConfig().settings()  # older readers keep reading these checkpoints
    assert LOW_RANK.settings()["affine_rank"] == RANK
    assert hlc.LayerCollapseConfig.from_dict(LOW_RANK.to_dict()) == LOW_RANK


def test_the_fitted_map_is_the_full_affine_fit_and_only_the_correction_trains():
    """Same calibration data: W₀ is exactly the full target's fitted W, so at α = 1 (B = 0) both models agree; the
    trainable values are α, b and A, B — r·(d_in + d_out) + d_out + 1 per block, as estimate_memory says."""
    original = tiny_model("bert")
    batches = calibration(original)
    full = hlc.get_collapse_model(copy.deepcopy(original), hlc.LayerCollapseConfig(linear_target="affine"),
                                  calibration_data=batches)
    low = hlc.get_collapse_model(copy.deepcopy(original), LOW_RANK, calibration_data=batches)
    for a, b in zip(hlc.injected_activations(full).values(), hlc.injected_activations(low).values()):
        assert isinstance(b.target, LowRankAffine) and b.target.rank == RANK
        assert torch.equal(a.affine_weight, b.affine_weight) and torch.equal(a.affine_bias, b.affine_bias)
        assert torch.count_nonzero(b.affine_lora_B) == 0 and torch.count_nonzero(b.affine_lora_A) > 0
        assert "affine_weight" in dict(b.named_buffers()) and "affine_weight" not in dict(b.named_parameters())
        assert [id(p) for p in b.target_parameters()] == [id(b.affine_bias), id(b.affine_lora_A), id(b.affine_lora_B)]
    inputs = make_inputs(original)
    set_alphas(full, 1.0)
    set_alphas(low, 1.0)
    assert max_abs_diff(outputs(low, inputs), outputs(full, inputs)) <= 1e-6

    d = 32  # tiny BERT: 32 -> 37 -> 32 blocks
    per_block = 1 + d + RANK * (d + d)
    units = len(hlc.injected_activations(low))
    trainable = sum(p.numel() for n, p in low.named_parameters() if ".intermediate_act_fn." in n)
    assert trainable == units * per_block
    estimate = hlc.estimate_memory(original, LOW_RANK)
    assert estimate.trainable_parameters == units * per_block
    assert estimate.added_parameters == units * (per_block + d * d)  # the frozen map too
    assert hlc.estimate_memory(original, hlc.LayerCollapseConfig(linear_target="affine")).trainable_parameters == (
        units * (1 + d * d + d))


def test_fitting_leaves_the_global_random_stream_alone():
    """A is drawn from its own seeded generator: a refit during training cannot change the data order."""
    model = tiny_model("bert")
    batches = calibration(model)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    model = hlc.get_collapse_model(model, LOW_RANK, calibration_data=batches)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(11)
    hlc.refit_linear_targets(model, batches)
    assert torch.equal(torch.rand(3), expected)


def test_collapse_merges_the_corrected_map():
    """The merged projection is (W₀ + B·A)·x + b, checked against that product on the block's own input."""
    model = hlc.get_collapse_model(tiny_model("bert"), LOW_RANK, calibration_data=calibration(tiny_model("bert")))
    inputs = make_inputs(model)
    torch.manual_seed(5)
    expected = {}
    with torch.no_grad():
        for name, act in hlc.injected_activations(model).items():
            act.affine_lora_B.normal_()
            act.affine_bias.add_(0.3)
            expected[name] = act.affine_weight + act.affine_lora_B @ act.affine_lora_A, act.affine_bias.clone()
    set_alphas(model, 1.0)
    linear = outputs(model, inputs)
    hlc.collapse_model(model)
    assert max_rel_diff(outputs(model, inputs), linear) <= 1e-5
    for name, (weight, bias) in expected.items():
        merged = model.get_submodule(name).output.dense  # the tiny BERT's block ends at output.dense
        torch.testing.assert_close(merged.weight, weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged.bias, bias, rtol=1e-6, atol=1e-6)


def test_training_moves_the_correction_and_never_the_fitted_map(tmp_path):
    """A few Trainer steps with weight decay: A, B, b and α move, W₀ does not; the targets are exempt from decay."""
    model = gated_model("llama", causal_lm=True)
    batches = calibration(model)
    model = hlc.get_collapse_model(model, hlc.LayerCollapseConfig(linear_target="affine", affine_rank=2,
                                                                  init_alpha=0.5), calibration_data=batches)
    before = {n: {k: t.detach().clone() for k, t in a.target_tensors().items()}
              for n, a in hlc.injected_activations(model).items()}
    ids = torch.cat([b["input_ids"] for b in batches])
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=4, optim="adamw_torch",
                         learning_rate=1e-2, weight_decay=0.5)
    trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=data)
    decayed = {id(p) for group in trainer.create_optimizer().param_groups if group["weight_decay"] > 0
               for p in group["params"]}
    trainer.train()
    for name, act in hlc.injected_activations(model).items():
        assert not decayed & {id(p) for p in act.target_parameters()}
        now = act.target_tensors()
        assert torch.equal(now["affine_weight"], before[name]["affine_weight"])
        for key in ("affine_bias", "affine_lora_A", "affine_lora_B"):
            assert not torch.equal(now[key], before[name][key]), (name, key)


def test_record_names_the_rank_and_a_corrupt_rank_is_refused(tmp_path):
    model = hlc.get_collapse_model(tiny_model("bert"), LOW_RANK, calibration_data=calibration(tiny_model("bert")))
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["layercollapse"]
    entry = next(iter(record["blocks"].values()))
    assert record["format"] == 4 and entry["affine"] is True and entry["affine_rank"] == RANK
    layout = hlc.injected_activations(model)["encoder.layer.0"].layout
    assert target_from_record(entry, layout) == LowRankAffine(rank=RANK)
    assert target_from_record({k: v for k, v in entry.items() if k != "affine_rank"}, layout) == Affine()
    with pytest.raises(LayerCollapseConfigError, match=r"'affine_rank': 'x'.*corrupt"):
        target_from_record({**entry, "affine_rank": "x"}, layout, where="Block encoder.layer.0")


# ------------------------------------------------------------------------------------------------------ PEFT


def test_full_affine_through_peft_points_to_the_rank():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=r"affine_rank="):
        get_peft_model(model, hlc.LayerCollapseConfig(linear_target="affine"))
    with pytest.raises(LayerCollapseConfigError, match=r"set affine_rank="):
        hlc.LayerCollapseConfig(linear_target="affine", lora_config={"r": 4, "target_modules": ["query"]})


def test_lora_and_the_low_rank_target_train_save_load_and_merge_together(tmp_path):
    """LoRA on the block's output projection: the blend at α = 0.5 sees the LoRA-adapted projection, the adapter
    file holds W₀ (a buffer), the correction and α, reloads to the same outputs, and merge_and_unload gives one
    projection per collapsed block that matches the PEFT model; unload gives the original model back."""
    base = gated_model("llama", causal_lm=True)
    batches = calibration(base)
    inputs = make_inputs(base)
    original = outputs(base, inputs)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "q_proj"], init_lora_weights=False)
    peft_model = hlc.get_lora_collapse_model(copy.deepcopy(base), lora, LOW_RANK, calibration_data=batches)
    reference = hlc.get_collapse_model(copy.deepcopy(base), LOW_RANK, calibration_data=batches)
    layers = hlc.injected_activations(peft_model)
    for layer, act in zip(layers.values(), hlc.injected_activations(reference).values()):  # fitted on the base model
        torch.testing.assert_close(layer.target_tensors()["affine_weight"], act.affine_weight, rtol=0, atol=0)
    trainable = {n.rsplit(".", 2)[-2] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {"layercollapse_affine_bias", "layercollapse_affine_lora_A", "layercollapse_affine_lora_B",
            "layercollapse_alpha"} <= trainable and "layercollapse_affine_weight" not in trainable
    with torch.no_grad():
        for layer in layers.values():
            layer.target_tensors()["affine_lora_B"].normal_(std=0.2)
    set_alphas(peft_model, 0.5, 1.0)
    lora_down = outputs(peft_model, inputs)
    with peft_model.disable_adapter():
        assert max_abs_diff(outputs(peft_model, inputs), original) == 0.0
    with torch.no_grad():  # the down_proj LoRA reaches the blended output of the block left at α = 0.5
        peft_model.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight.zero_()
    assert max_abs_diff(outputs(peft_model, inputs), lora_down) > 1e-4
    with torch.no_grad():
        peft_model.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight.normal_(std=0.2)
    wrapped = outputs(peft_model, inputs)

    peft_model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(".layercollapse_affine_weight" in k for k in saved) == len(layers)
    assert sum(".layercollapse_affine_lora_B" in k for k in saved) == len(layers)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert max_abs_diff(outputs(loaded, inputs), wrapped) == 0.0

    merged = loaded.merge_and_unload()
    report = loaded.base_model.collapse_report
    assert [b.status for b in report.blocks] == ["kept", "collapsed"]
    assert max_rel_diff(outputs(merged, inputs), wrapped) <= 1e-5
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert max_abs_diff(outputs(again, inputs), outputs(merged, inputs)) <= 1e-6
    left = hlc.injected_activations(again)
    assert list(left) == ["model.layers.0.mlp"] and isinstance(left["model.layers.0.mlp"].target, LowRankAffine)

    unloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").unload()
    assert max_abs_diff(outputs(unloaded, inputs), original) == 0.0  # no hook of the target is left behind


def test_plain_peft_adapter_is_calibrated_on_the_base_model(tmp_path):
    """get_peft_model fits W₀ on a dummy batch; calibrate_linear_targets refits it on the data (adapters off)."""
    base = tiny_model("bert")
    batches = calibration(base)
    peft_model = get_peft_model(copy.deepcopy(base), LOW_RANK)
    reference = hlc.get_collapse_model(copy.deepcopy(base), LOW_RANK, calibration_data=batches)
    hlc.calibrate_linear_targets(peft_model, batches)
    for layer, act in zip(hlc.injected_activations(peft_model).values(),
                          hlc.injected_activations(reference).values()):
        torch.testing.assert_close(layer.target_tensors()["affine_weight"], act.affine_weight, rtol=0, atol=0)
    model = AutoModel.from_config(base.config)  # unrelated weights: the adapter alone carries the fitted map
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(model, tmp_path)
    for layer, act in zip(hlc.injected_activations(loaded).values(), hlc.injected_activations(reference).values()):
        torch.testing.assert_close(layer.target_tensors()["affine_weight"], act.affine_weight, rtol=0, atol=0)


def test_a_second_adapter_with_lora_blends_with_its_lora_projections():
    """Hooks are placed again when an adapter adds LoRA to the block's projections: the blend of the new adapter sees
    the LoRA-adapted output projection."""
    base = gated_model("llama", causal_lm=True)
    batches = calibration(base)
    inputs = make_inputs(base)
    peft_model = get_peft_model(copy.deepcopy(base), LOW_RANK)
    second = hlc.LayerCollapseConfig(linear_target="affine", affine_rank=RANK, lora_config=LoraConfig(
        r=4, target_modules=["down_proj"], init_lora_weights=False))
    peft_model.add_adapter("second", second)
    peft_model.set_adapter("second")
    hlc.calibrate_linear_targets(peft_model, batches, "second")
    downs = [layer.mlp.down_proj for layer in peft_model.base_model.model.model.layers]
    set_alphas(peft_model, 0.5, 0.5)
    with_lora = outputs(peft_model, inputs)
    set_alphas(peft_model, 1.0, 1.0)
    linear = outputs(peft_model, inputs)
    with torch.no_grad():
        for down in downs:
            down.lora_B["second"].weight.zero_()
    # at α = 1 the blocks are their affine maps: the output projection's LoRA is inside what they replace
    assert max_abs_diff(outputs(peft_model, inputs), linear) <= 1e-6
    set_alphas(peft_model, 0.5, 0.5)
    assert max_abs_diff(outputs(peft_model, inputs), with_lora) > 1e-4
    with peft_model.disable_adapter():
        assert max_abs_diff(outputs(peft_model, inputs), outputs(base, inputs)) == 0.0
