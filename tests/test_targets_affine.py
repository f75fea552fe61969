"""`LayerCollapseConfig(linear_target="affine")`: a block, plain or gated, blends its output towards its
least-squares affine map `W·x + b` (learnable); exact at α = 0, that map at α = 1; saved, reloaded, trained,
refitted."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import gated_model, make_inputs, max_abs_diff, max_rel_diff, num_params, outputs, set_alphas, tiny_model
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, TrainingArguments
from transformers.pytorch_utils import Conv1D

import hf_layercollapse as hlc
from hf_layercollapse.errors import LayerCollapseConfigError
from hf_layercollapse.modules import projection_shape
from hf_layercollapse.saving import write_manifest

AFFINE = hlc.LayerCollapseConfig(linear_target="affine")
GATED = {"llama", "phi3", "t5-gated"}


def build(name: str, causal_lm: bool = False) -> torch.nn.Module:
    return gated_model(name, causal_lm=causal_lm) if name in GATED else tiny_model(name)


def calibration(model) -> list[dict[str, torch.Tensor]]:
    """Enough tokens (4 batches) for a well-posed fit of a 32 -> 32 map; padding in the first batch."""
    batches = []
    for seed in range(4):
        batch = make_inputs(model, seed=seed + 1)
        batches.append({k: torch.cat([v] * 4) for k, v in batch.items()})
    if "attention_mask" in batches[0]:
        batches[0]["attention_mask"][0, -2:] = 0  # padding is left out of the fit
    return batches


def block_io(model, block, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Every non-padding token's block input x (into the input projection) and output y (of the output projection)."""
    captured: dict[str, list[torch.Tensor]] = {"x": [], "y": []}
    fc1, fc2 = model.get_submodule(block.path("input")), model.get_submodule(block.path("output"))
    handles = [fc1.register_forward_pre_hook(lambda m, args: captured["x"].append(args[0])),
               fc2.register_forward_hook(lambda m, args, out: captured["y"].append(out))]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured["x"]]).double()
    y = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured["y"]]).double()
    if "attention_mask" in batches[0]:
        keep = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
        x, y = x[keep], y[keep]
    return x, y


def test_affine_target_is_the_relative_least_squares_map_and_injection_is_exact():
    model = tiny_model("bert")
    batches = calibration(model)
    block = hlc.find_mlp_blocks(model)[1]
    x, y = block_io(model, block, batches)
    inputs = make_inputs(model)
    before = outputs(model, inputs)
    hlc.get_collapse_model(model, AFFINE, calibration_data=batches)
    act = hlc.injected_activations(model)[block.name]
    # the same minimiser written as one least-squares problem: rows √wₜ·[xₜ, 1] with wₜ = 1/mean(yₜ²), plus the
    # ridge rows √(1e-4·mean diag XᵀWX)·I on the weights (not the bias)
    w = 1.0 / y.pow(2).mean(1, keepdim=True)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    ridge = (1e-4 * (w * x * x).sum(0).mean()) ** 0.5
    rows = torch.cat([w.sqrt() * design, torch.cat([ridge * torch.eye(x.shape[1], dtype=x.dtype),
                                                    torch.zeros(x.shape[1], 1, dtype=x.dtype)], 1)])
    targets = torch.cat([w.sqrt() * y, torch.zeros(x.shape[1], y.shape[1], dtype=y.dtype)])
    solution = torch.linalg.lstsq(rows, targets).solution
    torch.testing.assert_close(act.affine_weight.double(), solution[:-1].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(act.affine_bias.double(), solution[-1], rtol=1e-4, atol=1e-5)
    assert max_abs_diff(outputs(model, inputs), before) == 0.0  # α = 0: exactly the original model
    assert set(act.target_tensors()) == {"affine_weight", "affine_bias"}  # the activation itself is left as it is
    # α = 1: the block is that map
    set_alphas(model, 1.0)
    captured = []
    handle = model.get_submodule(block.path("output")).register_forward_hook(
        lambda m, args, out: captured.append(out))
    stash = []
    pre = model.get_submodule(block.path("input")).register_forward_pre_hook(lambda m, args: stash.append(args[0]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    pre.remove()
    expected = torch.nn.functional.linear(stash[0], act.affine_weight, act.affine_bias)
    torch.testing.assert_close(captured[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "whisper", "llama", "phi3", "t5-gated"])
def test_affine_target_blends_collapses_exactly_and_reloads(name, tmp_path):
    """Plain (Linear, GPT-2's Conv1D, bias-free T5, encoder-decoder Whisper) and gated (separate and fused Phi-3
    gate_up_proj, gated T5) blocks: the blend at α = 0.4 is (1−α)·block + α·map, saved mid-training and reloaded
    with its maps; at α = 1 the collapsed model matches, saves the formula's parameters and reloads."""
    model = build(name)
    inputs = make_inputs(model)
    batches = calibration(model)
    original = copy.deepcopy(model)
    original_params = num_params(model)
    hlc.get_collapse_model(model, AFFINE, calibration_data=batches)
    acts = hlc.injected_activations(model)
    assert len(acts) == len(hlc.find_mlp_blocks(original))
    set_alphas(model, 0.4)
    blended = outputs(model, inputs)
    # the same blend computed by hand on the original model: each block's output replaced by 0.6·y + 0.4·(W·x + b)
    handles = []
    for name_, act in acts.items():
        block = next(b for b in hlc.find_mlp_blocks(original) if b.name == name_)
        stash = {}
        handles.append(original.get_submodule(block.path("input")).register_forward_pre_hook(
            lambda m, args, s=stash: s.__setitem__("x", args[0])))
        handles.append(original.get_submodule(block.path("output")).register_forward_hook(
            lambda m, args, out, s=stash, a=act: 0.6 * out + 0.4 * torch.nn.functional.linear(
                s["x"], a.affine_weight, a.affine_bias)))
    by_hand = outputs(original, inputs)
    for handle in handles:
        handle.remove()
    assert max_rel_diff(blended, by_hand) <= 1e-5
    model.save_pretrained(tmp_path / "injected")
    plan = json.loads((tmp_path / "injected" / "config.json").read_text())["layercollapse"]
    assert plan["format"] == 3 and all(e["affine"] for e in plan["blocks"].values())
    loaded = AutoModel.from_pretrained(tmp_path / "injected").eval()
    for act, twin in zip(acts.values(), hlc.injected_activations(loaded).values()):
        assert torch.equal(twin.affine_weight, act.affine_weight) and torch.equal(twin.affine_bias, act.affine_bias)
        assert twin.alpha_value == pytest.approx(0.4)
    assert max_abs_diff(outputs(loaded, inputs), blended) <= 1e-6

    set_alphas(model, 1.0)
    linear = outputs(model, inputs)
    report = hlc.collapse_model(model)
    assert len(report.collapsed) == len(acts)
    assert {row.kind for row in report.blocks} == {"gated" if name in GATED else "plain"}
    assert max_rel_diff(outputs(model, inputs), linear) <= 1e-5
    saved = 0
    for block in hlc.find_mlp_blocks(original):
        owner = original.get_submodule(block.name)
        parts = {*block.layout.inputs, block.layout.output}
        before = sum(p.numel() for part in parts for p in owner.get_submodule(part).parameters())
        d_in, d_out = projection_shape(owner.get_submodule(block.layout.input))[0], projection_shape(
            owner.get_submodule(block.layout.output))[1]
        saved += before - (d_in * d_out + d_out)  # the merged map always has a bias (b of the fit)
    assert original_params - num_params(model) == saved == report.params_saved
    model.save_pretrained(tmp_path / "collapsed")
    reloaded = AutoModel.from_pretrained(tmp_path / "collapsed").eval()
    assert max_rel_diff(outputs(reloaded, inputs), linear) <= 1e-5


def test_partly_collapsed_gated_lm_with_affine_targets_reloads_and_generates(tmp_path):
    model = gated_model("llama", causal_lm=True)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    hlc.get_collapse_model(model, AFFINE, calibration_data=[{"input_ids": torch.randint(1, 99, (8, 12))}])
    first, last = hlc.injected_activations(model).values()
    last.alpha.data.fill_(1.0)
    first.alpha.data.fill_(0.3)
    hlc.collapse_model(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(hlc.injected_activations(reloaded)) == 1
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(reloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)


def test_a_deep_copy_blends_with_its_own_maps():
    """The hooks are bound methods of the activation: a copied model (the Trainer's, a benchmark's clone) must use
    the copy's maps, not the original's."""
    model = tiny_model("gpt2")
    inputs = make_inputs(model)
    hlc.get_collapse_model(model, AFFINE, calibration_data=calibration(model))
    set_alphas(model, 0.5)
    before = outputs(model, inputs)
    clone = copy.deepcopy(model)
    assert max_abs_diff(outputs(clone, inputs), before) == 0.0
    with torch.no_grad():
        for act in hlc.injected_activations(clone).values():
            act.affine_weight.mul_(3.0)
    assert max_abs_diff(outputs(model, inputs), before) == 0.0
    assert max_abs_diff(outputs(clone, inputs), before) > 1e-3


class _Loss(torch.nn.Module):
    """A model with a loss: the mean of the last hidden state."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return {"loss": self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean()}


def _rows(batches) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i]} for b in batches
            for i in range(len(b["input_ids"]))]


def test_the_trainer_trains_the_map_without_decay_and_holds_it_before_its_stage(tmp_path):
    model = tiny_model("bert")
    batches = calibration(model)
    # α starts at 0.3, not 0: the maps are in the output from the first step, so only the hold keeps the first one
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(linear_target="affine", init_alpha=0.3),
                           calibration_data=batches)
    acts = hlc.injected_activations(model)
    first, last = acts
    start = {n: (a.affine_weight.detach().clone(), a.affine_bias.detach().clone()) for n, a in acts.items()}
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", disable_tqdm=True, use_cpu=True, learning_rate=1e-2,
                             weight_decay=0.5)
    # the deepest block is regularised during steps 2-3; the first block's stage never starts
    collapse_args = hlc.CollapseArguments(alpha_learning_rate=0.1, progressive_steps=2, progressive_start=1)
    trainer = hlc.LayerCollapseTrainer(model=_Loss(model), args=args, train_dataset=_rows(batches),
                                       collapse_args=collapse_args)
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    assert not [n for n in decayed if "affine" in n]
    trainer.train()
    assert acts[last].alpha_value > 0.3 and acts[first].alpha_value == pytest.approx(0.3)
    assert not torch.equal(acts[last].affine_weight, start[last][0])  # the map trains with α
    assert torch.equal(acts[first].affine_weight, start[first][0])  # held, like α, until its stage
    assert torch.equal(acts[first].affine_bias, start[first][1])


def test_refit_gives_the_map_of_the_moved_model_and_changes_no_output():
    original = gated_model("llama")
    batches = calibration(original)
    model = hlc.get_collapse_model(copy.deepcopy(original), AFFINE, calibration_data=batches)
    moved = copy.deepcopy(original)
    with torch.no_grad():
        for m in (model, moved):
            for block in hlc.find_mlp_blocks(original):
                m.get_submodule(block.path("output")).weight.mul_(1.5).add_(0.05)
    expected = hlc.injected_activations(hlc.get_collapse_model(moved, AFFINE, calibration_data=batches))
    acts = hlc.injected_activations(model)
    first, last = acts
    acts[last].alpha.data.fill_(0.5)  # its output depends on its map: it keeps it
    kept = acts[last].affine_weight.detach().clone()
    inputs = make_inputs(model)
    before = outputs(model, inputs)
    assert hlc.refit_linear_targets(model, batches) == [first]
    assert max_abs_diff(outputs(model, inputs), before) == 0.0
    torch.testing.assert_close(acts[first].affine_weight, expected[first].affine_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acts[first].affine_bias, expected[first].affine_bias, rtol=1e-5, atol=1e-6)
    assert torch.equal(acts[last].affine_weight, kept)


def test_bad_uses_of_the_affine_target(tmp_path):
    with pytest.raises(ValueError, match="needs activation='blend'"):
        hlc.LayerCollapseConfig(linear_target="affine", activation="prelu")
    with pytest.raises(ValueError, match="pass calibration_data="):
        hlc.get_collapse_model(tiny_model("bert"), AFFINE)
    with pytest.raises(ValueError, match="not offered through PEFT: set affine_rank="):
        get_peft_model(tiny_model("bert"), hlc.LayerCollapseConfig(linear_target="affine"))
    model = tiny_model("bert")
    hlc.get_collapse_model(model, AFFINE, calibration_data=calibration(model))
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    key = next(k for k in weights if k.endswith("affine_weight"))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(tmp_path)  # an edit that also rewrites the manifest: the record's shapes still catch it
    with pytest.raises(LayerCollapseConfigError, match=r"intermediate_act_fn\.affine_weight.*nothing was loaded"):
        AutoModel.from_pretrained(tmp_path)


def test_conv1d_blocks_merge_into_a_conv1d():
    model = tiny_model("gpt2")
    hlc.get_collapse_model(model, AFFINE, calibration_data=calibration(model))
    set_alphas(model, 1.0)
    hlc.collapse_model(model)
    block = hlc.find_mlp_blocks(tiny_model("gpt2"))[0]
    assert isinstance(model.get_submodule(block.path("output")), Conv1D)


@pytest.mark.assets
def test_real_smollm2_affine_targets_beat_the_fitted_gate_and_collapse_exactly(tmp_path):
    """The real SmolLM2-135M, its last two gated blocks at α = 1 (no training): each block's affine map costs far less
    held-out loss than the best constant gate (measured: 4.489 original, 4.917 affine, 5.160 fitted gate, 5.276 mean
    gate); collapsed, saved and reloaded with AutoModelForCausalLM, the logits stay the same."""
    import offline_assets as assets

    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = assets.load_shakespeare()["validation"]["text"][0]
    encoded = tokenizer([text[i:i + 600] for i in range(0, 9600, 600)], return_tensors="pt", padding=True,
                        truncation=True, max_length=96)
    batches = [{k: v[i:i + 4] for k, v in encoded.items()} for i in range(0, 12, 4)]
    heldout = {k: v[12:16] for k, v in encoded.items()}
    labels = heldout["input_ids"].masked_fill(heldout["attention_mask"] == 0, -100)

    def linearised(linear_target: str):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        config = hlc.LayerCollapseConfig(layers_to_transform=[-2, -1], linear_target=linear_target)
        hlc.get_collapse_model(model, config, calibration_data=batches)
        set_alphas(model, 1.0)
        with torch.no_grad():
            return model, float(model(**heldout, labels=labels).loss)

    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        base = float(original(**heldout, labels=labels).loss)
    _, gate = linearised("fitted")
    model, affine = linearised("affine")
    assert affine - base < 0.75 * (gate - base)
    with torch.no_grad():
        linear = model(**heldout).logits
    report = hlc.collapse_model(model)
    assert len(report.collapsed) == 2 and report.params_saved == 2 * (3 * 576 * 1536 - (576 * 576 + 576))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        collapsed = reloaded(**heldout).logits
    assert (collapsed - linear).abs().max() <= 1e-5 * linear.abs().max()


def test_padding_is_left_out_of_the_fit_also_where_the_mlp_sees_flattened_tokens():
    """OPT flattens its tokens to [batch·seq, d] before the MLP: the padded tokens must still be left out of the fit
    (the map does not change when only the padded token ids do)."""
    model = tiny_model("opt")
    batches = calibration(model)
    other = copy.deepcopy(batches)
    other[0]["input_ids"][0, -2:] = (other[0]["input_ids"][0, -2:] + 7) % 90 + 3  # the padded positions only
    maps = []
    for data in (batches, other):
        injected = hlc.get_collapse_model(copy.deepcopy(model), AFFINE, calibration_data=data)
        maps.append([a.affine_weight.detach().clone() for a in hlc.injected_activations(injected).values()])
    for first, second in zip(*maps):
        torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-6)


def test_a_fully_collapsed_checkpoint_is_written_in_the_oldest_format(tmp_path):
    model = tiny_model("bert")
    hlc.get_collapse_model(model, AFFINE, calibration_data=calibration(model))
    set_alphas(model, 1.0)
    hlc.collapse_model(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["layercollapse"]["format"] == 1


def test_inspect_counts_the_merged_bias_and_leaves_the_maps_out(tmp_path, capsys):
    from hf_layercollapse.cli import main
    from hf_layercollapse.collapse import model_params

    model = tiny_model("t5")  # no biases: the merged map gets one (b of the fit)
    hlc.get_collapse_model(model, AFFINE, calibration_data=calibration(model))
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parameters"] == model_params(model) < num_params(model)
    assert {b["params_after"] for b in result["blocks"]} == {32 * 32 + 32}


def test_affine_target_with_lora_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"cannot be combined with lora_config: set affine_rank="):
        hlc.LayerCollapseConfig(linear_target="affine", lora_config={"target_modules": ["query"]})
