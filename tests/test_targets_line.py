"""`LayerCollapseConfig(linear_target="fitted")` on plain MLP blocks: the activation blends towards its per-channel
least-squares line `a·z + b` instead of the identity; exact at α = 0, collapsible at α = 1, saved and reloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    hidden_size,
    make_inputs,
    max_abs_diff,
    max_rel_diff,
    num_params,
    outputs,
    set_alphas,
    tiny_model,
)
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, TrainingArguments

import hf_layercollapse as hlc

FITTED = hlc.LayerCollapseConfig(linear_target="fitted")


def calibration(model) -> list[dict[str, torch.Tensor]]:
    batches = [make_inputs(model, seed=s) for s in (1, 2)]
    if "attention_mask" in batches[0]:
        batches[0]["attention_mask"][0, -2:] = 0  # padding is left out of the fit
    return batches


def test_fitted_line_is_the_per_channel_least_squares_line_and_injection_is_exact():
    model = tiny_model("bert")
    batches = calibration(model)
    block = hlc.find_mlp_blocks(model)[1]
    captured = []
    handle = model.get_submodule(block.path("act")).register_forward_hook(
        lambda m, args, out: captured.append((args[0], out)))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    keep = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    z = torch.cat([c[0].reshape(-1, c[0].shape[-1]) for c in captured])[keep].double()
    g = torch.cat([c[1].reshape(-1, c[1].shape[-1]) for c in captured])[keep].double()
    inputs = make_inputs(model)
    before = outputs(model, inputs)
    hlc.get_collapse_model(model, FITTED, calibration_data=batches)
    act = hlc.injected_activations(model)[block.name]
    for channel in (0, 7, 63):
        design = torch.stack([z[:, channel], torch.ones_like(z[:, channel])], 1)
        slope, offset = torch.linalg.lstsq(design, g[:, channel:channel + 1]).solution.squeeze(1)
        assert float(act.slope[channel]) == pytest.approx(float(slope), rel=1e-4, abs=1e-5)
        assert float(act.offset[channel]) == pytest.approx(float(offset), rel=1e-4, abs=1e-5)
    assert max_abs_diff(outputs(model, inputs), before) == 0.0  # α = 0: exactly the original model
    set_alphas(model, 1.0)
    with torch.no_grad():
        probe = torch.randn(3, hidden_size("bert"))
        torch.testing.assert_close(act(probe), torch.addcmul(act.offset, act.slope, probe), rtol=0, atol=0)


@torch.no_grad()
def test_fitted_and_affine_targets_are_far_smaller_changes_than_the_identity_on_real_minilm(minilm_and_tweets):
    """The reason for the options, in numbers: with the last two blocks at α = 1 (no training), the fitted lines keep
    the real MiniLM's hidden states far closer to the original than the paper's identity (measured: 0.60 vs 1.18
    relative error; most GELU channels are mostly negative, where GELU is near 0, not near the identity), and each
    block's least-squares affine map closer still (0.55; a line per channel is one of the maps it can be)."""
    model, batches = minilm_and_tweets
    inputs = batches[-1]
    mask = inputs["attention_mask"].unsqueeze(-1)
    original = model(**inputs).last_hidden_state * mask

    def linearised(linear_target: str) -> float:
        config = hlc.LayerCollapseConfig(layers_to_transform=[-2, -1], linear_target=linear_target)
        clone = hlc.get_collapse_model(AutoModel.from_pretrained(model.name_or_path).eval(), config,
                                       calibration_data=batches[:-1])
        set_alphas(clone, 1.0)
        out = clone(**inputs).last_hidden_state * mask
        return float((out - original).norm() / original.norm())

    fitted, identity, affine = linearised("fitted"), linearised("default"), linearised("affine")
    assert fitted < 0.6 * identity
    assert affine < 0.92 * fitted


def test_fitted_lines_stay_fixed_while_alpha_trains(tmp_path):
    model = tiny_model("bert")
    batches = calibration(model)
    hlc.get_collapse_model(model, FITTED, calibration_data=batches)
    lines = {n: (a.slope.clone(), a.offset.clone()) for n, a in hlc.injected_activations(model).items()}
    data = [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i]} for b in batches
            for i in range(len(b["input_ids"]))]

    class Loss(torch.nn.Module):  # a model with a loss: the mean of the last hidden state
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return {"loss": self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean()}

    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", disable_tqdm=True, use_cpu=True, learning_rate=1e-2)
    hlc.LayerCollapseTrainer(model=Loss(model), args=args, train_dataset=data,
                             collapse_args=hlc.CollapseArguments(alpha_learning_rate=0.1)).train()
    for name, act in hlc.injected_activations(model).items():
        assert act.alpha_value > 0.1
        assert torch.equal(act.slope, lines[name][0]) and torch.equal(act.offset, lines[name][1])


def test_bad_uses_of_the_fitted_target():
    with pytest.raises(ValueError, match="linear_target='lowest'"):
        hlc.LayerCollapseConfig(linear_target="lowest")
    with pytest.raises(ValueError, match="needs activation='blend'"):
        hlc.LayerCollapseConfig(linear_target="fitted", activation="prelu")
    with pytest.raises(ValueError, match="pass calibration_data="):
        hlc.get_collapse_model(tiny_model("bert"), FITTED)
    with pytest.raises(ValueError, match="pass calibration_data="):
        hlc.get_lora_collapse_model(tiny_model("bert"), LoraConfig(target_modules=["query"]), FITTED)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_fitted_lines_through_peft_equal_get_collapse_model_and_survive_save_merge_and_reload(name, tmp_path):
    """PEFT on plain blocks with linear_target="fitted": calibrate_linear_targets gives the lines of
    get_collapse_model (base model, same data); α = 0 is exact; at α = 0.5 the outputs match; the adapter saves and
    reloads its lines; merge_and_unload collapses the α = 1 block towards its line and keeps the other injected with
    its line, and that checkpoint reloads with AutoModel."""
    from peft import PeftModel

    from hf_layercollapse.peft import calibrate_linear_targets

    original = tiny_model(name)
    batches = calibration(original)
    inputs = make_inputs(original)
    before = outputs(original, inputs)
    reference = hlc.get_collapse_model(copy.deepcopy(original), FITTED, calibration_data=batches)
    peft_model = get_peft_model(copy.deepcopy(original), FITTED)
    calibrate_linear_targets(peft_model, batches)
    ours, theirs = hlc.injected_activations(peft_model), hlc.injected_activations(reference)
    assert [n.removeprefix("base_model.model.") for n in ours] == list(theirs)
    for (_, layer), act in zip(ours.items(), theirs.values()):
        line = layer.target_tensors()
        torch.testing.assert_close(line["slope"], act.slope, rtol=0, atol=0)
        torch.testing.assert_close(line["offset"], act.offset, rtol=0, atol=0)
        assert not line["slope"].requires_grad
    assert max_abs_diff(outputs(peft_model, inputs), before) == 0.0
    set_alphas(peft_model, 0.5)
    set_alphas(reference, 0.5)
    assert max_abs_diff(outputs(peft_model, inputs), outputs(reference, inputs)) < 1e-6
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter")
    assert max_abs_diff(outputs(reloaded, inputs), outputs(reference, inputs)) < 1e-6
    set_alphas(reloaded, 0.5, 1.0)
    set_alphas(reference, 0.5, 1.0)
    merged = reloaded.merge_and_unload()
    hlc.collapse_model(reference)
    assert [b.name for b in reloaded.base_model.collapse_report.collapsed] == [list(theirs)[-1]]
    assert num_params(merged) == num_params(reference)
    assert max_rel_diff(outputs(merged, inputs), outputs(reference, inputs)) < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert max_abs_diff(outputs(again, inputs), outputs(merged, inputs)) < 1e-6
    assert hlc.injected_activations(again)[next(iter(theirs))].slope is not None


def test_fitted_line_of_the_wrong_size_in_an_adapter_is_an_error(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    get_peft_model(tiny_model("bert"), FITTED).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if k.endswith("layercollapse_slope"))
    weights[key] = torch.zeros(weights[key].numel() + 3)
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(hlc.LayerCollapseConfigError, match=r"layercollapse_slope of .*\(67,\).*\(64,\)"):
        PeftModel.from_pretrained(tiny_model("bert"), tmp_path)


def test_decoder_blocks_use_the_decoder_mask_not_the_encoders():
    """Encoder-decoder models: the encoder's attention_mask must not drop decoder tokens (same lengths here)."""
    from hf_layercollapse.calibration import collect_statistics
    from hf_layercollapse.statistics import LineRequest

    model = tiny_model("t5")
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 3:] = 0  # 3 padded encoder tokens
    batch = {"input_ids": torch.randint(3, 90, (2, 6)), "attention_mask": mask,
             "decoder_input_ids": torch.randint(3, 90, (2, 6))}
    blocks = hlc.find_mlp_blocks(model)

    def counts(batch):
        stats = collect_statistics(model, {b: [LineRequest()] for b in blocks}, [batch])
        return {b.name.split(".")[0]: stats[b.name][LineRequest()].count for b in blocks}

    assert counts(batch) == {"encoder": 9, "decoder": 12}
    decoder_mask = torch.ones(2, 6, dtype=torch.long)
    decoder_mask[1, 4:] = 0
    assert counts({**batch, "decoder_attention_mask": decoder_mask}) == {"encoder": 9, "decoder": 10}


def _moved(model) -> torch.nn.Module:
    """``model`` after a stand-in for fine-tuning: the first (and gate) projection of every MLP block scaled and
    shifted."""
    with torch.no_grad():
        for block in hlc.find_mlp_blocks(model):
            for part in block.layout.inputs:
                part = f"{block.name}.{part}"
                model.get_submodule(part).weight.mul_(1.5).add_(0.05)
    return model


@pytest.mark.parametrize("name, linear_target", [("bert", "fitted"), ("llama", "default"), ("llama", "fitted"),
                                                  ("phi3", "fitted")])
def test_refit_linear_targets_fits_the_moved_model_and_changes_no_output(name, linear_target):
    """After the weights moved, a refit gives the targets that injecting the moved model would give (lines, c by
    mean or least squares), at α = 0 changes no output, and leaves a block whose α moved alone."""
    from helpers import gated_model

    original = gated_model(name) if name != "bert" else tiny_model(name)
    batches = calibration(original)
    config = hlc.LayerCollapseConfig(linear_target=linear_target)
    model = hlc.get_collapse_model(copy.deepcopy(original), config, calibration_data=batches)
    expected = hlc.get_collapse_model(_moved(copy.deepcopy(original)), config, calibration_data=batches)
    _moved(model)
    acts, wanted = hlc.injected_activations(model), hlc.injected_activations(expected)
    first, *_, last = list(acts)
    acts[last].alpha.data.fill_(0.5)  # this block's output depends on its target: it keeps it
    kept = {k: v.clone() for k, v in acts[last].state_dict().items()}
    inputs = make_inputs(model)
    before = outputs(model, inputs)
    assert hlc.refit_linear_targets(model, batches) == list(acts)[:-1]
    assert max_abs_diff(outputs(model, inputs), before) == 0.0
    target = "gate_constant" if name != "bert" else "slope"
    torch.testing.assert_close(getattr(acts[first], target), getattr(wanted[first], target), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(getattr(acts[first], target), getattr(hlc.injected_activations(
        hlc.get_collapse_model(copy.deepcopy(original), config, calibration_data=batches))[first], target))
    if name == "bert":
        torch.testing.assert_close(acts[first].offset, wanted[first].offset, rtol=1e-5, atol=1e-6)
    for key, value in acts[last].state_dict().items():
        assert torch.equal(value, kept[key]), key


def test_refit_linear_targets_bad_input():
    model = tiny_model("bert")
    batches = calibration(model)
    hlc.get_collapse_model(model, FITTED, calibration_data=batches)
    with pytest.raises(ValueError, match="not injected blocks"):
        hlc.refit_linear_targets(model, batches, blocks=["encoder.layer.9"])
    identity = hlc.get_collapse_model(tiny_model("bert"))
    assert hlc.refit_linear_targets(identity, batches) == []  # the identity has nothing to fit
    peft_model = get_peft_model(tiny_model("bert"), hlc.LayerCollapseConfig())
    with pytest.raises(ValueError, match="calibrate_linear_targets"):
        hlc.refit_linear_targets(peft_model, batches)


def test_peft_fitted_lines_per_adapter_and_the_trainers_warning_about_uncalibrated_lines(tmp_path, caplog):
    """Each adapter has its own lines (a second adapter, calibrated on other data, does not touch the first one's;
    deleting it removes them); the trainer warns while an adapter's lines come from get_peft_model's dummy batch
    only, and not once they are calibrated or read from a saved adapter."""
    import logging

    from peft import PeftModel

    from hf_layercollapse.peft import calibrate_linear_targets

    original = tiny_model("bert")
    batches, others = calibration(original), [make_inputs(original, seed=7)]
    args = TrainingArguments(str(tmp_path / "out"), report_to=[], use_cpu=True)

    def warned(model) -> bool:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_layercollapse.peft"):
            hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=[])
        return "dummy batch only" in caplog.text

    peft_model = get_peft_model(copy.deepcopy(original), FITTED)
    assert warned(peft_model)
    calibrate_linear_targets(peft_model, batches)
    assert not warned(peft_model)
    layer = next(iter(hlc.injected_activations(peft_model).values()))
    first = layer.layercollapse_slope["default"].clone()
    peft_model.add_adapter("other", FITTED)
    calibrate_linear_targets(peft_model, others, "other")
    assert sorted(layer.layercollapse_slope) == ["default", "other"]
    assert torch.equal(layer.layercollapse_slope["default"], first)
    assert not torch.equal(layer.layercollapse_slope["other"], first)
    peft_model.set_adapter("other")
    assert torch.equal(layer.target_tensors()["slope"], layer.layercollapse_slope["other"])
    peft_model.save_pretrained(tmp_path / "saved")
    saved = layer.layercollapse_slope["other"].clone()
    peft_model.delete_adapter("other")
    assert sorted(layer.layercollapse_slope) == ["default"] and layer.layercollapse_calibrated == {"default"}
    reloaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "saved" / "other", adapter_name="other")
    assert not warned(reloaded)
    loaded = next(iter(hlc.injected_activations(reloaded).values()))
    assert torch.equal(loaded.target_tensors()["slope"], saved)


def test_refit_follows_each_gated_blocks_own_rule_also_after_reloading(tmp_path):
    """Block 0 injected with linear_target="fitted" (least-squares c), block 1 later with "default" (mean c): a refit
    fits each one by its own rule, also on the model reloaded with from_pretrained."""
    from helpers import gated_model

    original = gated_model("llama")
    batches = calibration(original)

    def inject(model):
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[0], linear_target="fitted"),
                               calibration_data=batches)
        return hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[1]), calibration_data=batches)

    model = inject(copy.deepcopy(original))
    model.save_pretrained(tmp_path)
    expected = {}
    for n, c in hlc.injected_activations(inject(_moved(copy.deepcopy(original)))).items():
        expected[n] = c.gate_constant.detach()
    for candidate in (_moved(model), _moved(AutoModel.from_pretrained(tmp_path).eval())):
        acts = hlc.injected_activations(candidate)
        assert [a.target.fit for a in acts.values()] == ["least_squares", "mean"]
        hlc.refit_linear_targets(candidate, batches)
        for name, act in acts.items():
            torch.testing.assert_close(act.gate_constant.detach(), expected[name], rtol=1e-5, atol=1e-6)
