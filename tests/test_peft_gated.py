"""PEFT integration on gated MLP blocks (Llama, Qwen2, Phi-3's fused gate_up_proj, gated T5): the gate constant c
is an adapter parameter next to α. Injection, merge_and_unload against collapse_model, LoRA + LayerCollapse, the
initial c (dummy batch or calibration data), save/load, several adapters, the trainer, and bad input.

Every test compares numbers: outputs, weights, parameter counts, α and c.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    HEADS,
    TEXT,
    H,
    gated_model,
    gated_params_saved,
    logits,
    make_inputs,
    max_abs_diff,
    max_rel_diff,
    no_peft_left,
    num_params,
    outputs,
    random_lora,
    set_alphas,
    tiny_model,
    trainable_kinds,
)
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, TrainingArguments

import hf_layercollapse as hlc

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ARCHS = ["llama", "qwen2", "phi3", "t5-gated"]
#: LoRA targets per architecture: attention and every projection of the gated blocks (gate, up, down).
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "gate_up_proj", "down_proj"],
    "t5-gated": ["q", "v", "wi_0", "wi_1", "wo"],
}


def gate_of(act) -> torch.Tensor:
    """The gate constant ``c`` of an injected block (its active adapter's, on a PEFT layer)."""
    return act.target_tensors()["gate_constant"]


def set_gate_constants(model, seed: int = 3) -> dict[str, torch.Tensor]:
    """Give every injected gated block a random c (the same sequence for the same seed), in model order."""
    generator = torch.Generator().manual_seed(seed)
    constants = {}
    with torch.no_grad():
        for name, act in hlc.injected_activations(model).items():
            gate_of(act).copy_(torch.randn(gate_of(act).shape, generator=generator))
            constants[name] = gate_of(act).detach().clone()
    return constants


def lm_batches() -> list[dict[str, torch.Tensor]]:
    """Two calibration batches with padding (left out of the means)."""
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(2):
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, 4:] = 0
        batches.append({"input_ids": torch.randint(1, 99, (3, 7), generator=generator), "attention_mask": mask})
    return batches


def lm_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 99, (2, 9), generator=torch.Generator().manual_seed(7))}


# -------------------------------------------------------------------------------- get_peft_model / merge


@pytest.mark.parametrize("name", ARCHS)
def test_get_peft_model_on_gated_blocks_then_merge_and_unload_equals_collapse_model(name, tmp_path):
    model = gated_model(name)
    inputs = make_inputs(model)
    before = outputs(model, inputs)
    params_original = num_params(model)
    saved_per_block = gated_params_saved(model) // len(hlc.find_mlp_blocks(model))
    peft_model = get_peft_model(model, hlc.LayerCollapseConfig())
    assert max_abs_diff(outputs(peft_model, inputs), before) <= 1e-6  # α = 0: the original model
    acts = hlc.injected_activations(peft_model)
    assert trainable_kinds(peft_model) == {"lora": 0, "alpha": len(acts), "gate_constant": len(acts) * H,
                                           "saved_module": 0, "base": 0}

    reference = gated_model(name)  # the same α and c with the library's own path
    hlc.get_collapse_model(reference)
    for act, ref in zip(acts.values(), hlc.injected_activations(reference).values()):
        torch.testing.assert_close(gate_of(act).data, gate_of(ref).data, rtol=0, atol=0)  # same default c
    alphas = (1.0, 0.6) if name != "t5-gated" else (1.0, 0.6, 1.0, 1.0)  # one block far from 1: it is kept
    for wrapped_model in (peft_model, reference):
        set_alphas(wrapped_model, *alphas)
    constants = list(set_gate_constants(peft_model).values())
    set_gate_constants(reference)
    wrapped = outputs(peft_model, inputs)
    assert max_abs_diff(wrapped, outputs(reference, inputs)) == 0.0
    with peft_model.disable_adapter():
        assert max_abs_diff(outputs(peft_model, inputs), before) == 0.0
    report = hlc.collapse_model(reference)

    merged = peft_model.merge_and_unload()
    assert no_peft_left(merged) and peft_model.base_model.collapse_report.to_dict() == report.to_dict()
    assert merged.config.layercollapse["blocks"] == reference.config.layercollapse["blocks"]
    reference_state = reference.state_dict()
    assert merged.state_dict().keys() == reference_state.keys()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, reference_state[key], rtol=0, atol=0, msg=key)
    assert max_rel_diff(outputs(merged, inputs), wrapped) < 1e-5
    collapsed = len(alphas) - 1
    assert len(report.collapsed) == collapsed and report.params_saved == collapsed * saved_per_block
    assert num_params(merged) == params_original - collapsed * saved_per_block + (1 + H)  # + α and c of the kept one

    merged.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert max_abs_diff(outputs(loaded, inputs), outputs(merged, inputs)) <= 1e-6
    (kept,) = hlc.injected_activations(loaded).values()
    assert kept.alpha_value == pytest.approx(0.6)
    torch.testing.assert_close(gate_of(kept).data, constants[1], rtol=0, atol=0)  # the trained c of the kept one


@pytest.mark.parametrize("name", ARCHS)
def test_lora_on_gated_blocks_merged_then_collapsed_equals_the_peft_model_at_alpha_one(name, tmp_path):
    model = gated_model(name)
    inputs = make_inputs(model)
    before = outputs(model, inputs)
    params_original, saving = num_params(model), gated_params_saved(model)
    peft_model = hlc.get_lora_collapse_model(model, random_lora(LORA_TARGETS[name]))
    blocks = len(hlc.injected_activations(peft_model))
    kinds = trainable_kinds(peft_model)
    assert kinds["lora"] > 0 and kinds["alpha"] == blocks and kinds["gate_constant"] == blocks * H
    assert kinds["base"] == 0 and kinds["saved_module"] == 0
    assert max_abs_diff(outputs(peft_model, inputs), before) > 1e-3  # LoRA is active
    set_alphas(peft_model, 1.0)
    constants = set_gate_constants(peft_model)
    expected = outputs(peft_model, inputs)

    if name == "llama":  # the merged projection is (W_down + s·B·A)·diag(c)·(W_up + s·B·A), s = 8 / 4
        mlp = peft_model.base_model.model.layers[0].mlp
        up, down = mlp.up_proj, mlp.down_proj
        w_up = up.base_layer.weight + 2.0 * up.lora_B["default"].weight @ up.lora_A["default"].weight
        w_down = down.base_layer.weight + 2.0 * down.lora_B["default"].weight @ down.lora_A["default"].weight
        c = constants["base_model.model.layers.0.mlp"]
        want = (w_down @ (c[:, None] * w_up)).detach()

    merged, report = hlc.merge_lora_and_collapse(peft_model, return_report=True)
    assert len(report.collapsed) == blocks and no_peft_left(merged)
    assert num_params(merged) == params_original - saving
    assert max_rel_diff(outputs(merged, inputs), expected) < 1e-5
    if name == "llama":
        torch.testing.assert_close(merged.layers[0].mlp.down_proj.weight, want, rtol=1e-5, atol=1e-6)

    merged.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert max_abs_diff(outputs(loaded, inputs), outputs(merged, inputs)) <= 1e-6


# ------------------------------------------------------------------------------------------- initial c


def test_gate_constant_from_calibration_data_equals_get_collapse_model():
    batches = lm_batches()
    reference = gated_model("llama", causal_lm=True)
    hlc.get_collapse_model(reference, calibration_data=batches)
    expected = {n: gate_of(a).detach() for n, a in hlc.injected_activations(reference).items()}
    default = gated_model("llama", causal_lm=True)
    hlc.get_collapse_model(default)
    defaults = {n: gate_of(a).detach() for n, a in hlc.injected_activations(default).items()}
    assert all((expected[n] - defaults[n]).abs().max() > 1e-3 for n in expected)  # calibration makes a difference

    # get_lora_collapse_model(calibration_data=...): means of the base model, LoRA (random, active) switched off
    peft_model = hlc.get_lora_collapse_model(gated_model("llama", causal_lm=True), random_lora(["q_proj", "up_proj"]),
                                             calibration_data=batches)
    got = {n.removeprefix("base_model.model."): gate_of(a).detach()
           for n, a in hlc.injected_activations(peft_model).items()}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert trainable_kinds(peft_model)["gate_constant"] == 2 * H and trainable_kinds(peft_model)["lora"] > 0

    # peft.get_peft_model: the dummy-batch default first, calibrate_linear_targets then
    plain = get_peft_model(gated_model("llama", causal_lm=True), hlc.LayerCollapseConfig())
    acts = hlc.injected_activations(plain)
    for name, act in acts.items():
        torch.testing.assert_close(gate_of(act).data, defaults[name.removeprefix("base_model.model.")],
                                   rtol=0, atol=0)
    set_alphas(plain, 0.5)  # the means are those of the original model whatever the adapter's α
    means = hlc.calibrate_linear_targets(plain, batches)
    for name, act in acts.items():
        short = name.removeprefix("base_model.model.")
        torch.testing.assert_close(means[short]["gate_constant"], expected[short], rtol=0, atol=0)
        torch.testing.assert_close(gate_of(act).data, expected[short], rtol=0, atol=0)
        assert gate_of(act).requires_grad and act.alpha.requires_grad and act.alpha_value == 0.5


def test_fitted_gate_constant_through_peft_equals_get_collapse_model():
    batches = lm_batches()
    config = hlc.LayerCollapseConfig(linear_target="fitted")
    reference = gated_model("llama", causal_lm=True)
    hlc.get_collapse_model(reference, config, calibration_data=batches)
    expected = {n: gate_of(a).detach() for n, a in hlc.injected_activations(reference).items()}
    peft_model = hlc.get_lora_collapse_model(gated_model("llama", causal_lm=True), random_lora(["q_proj", "up_proj"]),
                                             config, calibration_data=batches)
    got = {n.removeprefix("base_model.model."): gate_of(a).detach()
           for n, a in hlc.injected_activations(peft_model).items()}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_second_adapter_gets_its_own_alpha_and_gate_constant():
    model = gated_model("llama", causal_lm=True)
    batch = lm_batch()
    before = logits(model, batch)
    peft_model = get_peft_model(model, hlc.LayerCollapseConfig())
    acts = hlc.injected_activations(peft_model)
    initial = {n: gate_of(a).detach().clone() for n, a in acts.items()}
    set_alphas(peft_model, 0.5)
    set_gate_constants(peft_model)
    first = logits(peft_model, batch)
    peft_model.add_adapter("other", hlc.LayerCollapseConfig(layers_to_transform=[-1]))
    layer = acts["base_model.model.model.layers.1.mlp"]
    assert sorted(layer.layercollapse_gate_constant) == ["default", "other"]
    # the new adapter's c is the base model's mean, not disturbed by the first adapter's α and c
    torch.testing.assert_close(layer.layercollapse_gate_constant["other"].data,
                               initial["base_model.model.model.layers.1.mlp"], rtol=0, atol=0)
    assert torch.equal(logits(peft_model, batch), first)  # "default" is still the active adapter
    peft_model.set_adapter("other")
    assert max_abs_diff([logits(peft_model, batch)], [before]) == 0.0  # α = 0 on the new adapter
    assert trainable_kinds(peft_model)["gate_constant"] == H  # only the active adapter trains
    with torch.no_grad():
        layer.alpha.fill_(1.0)
    merged = peft_model.merge_and_unload()
    assert [b.name for b in peft_model.base_model.collapse_report.collapsed] == ["model.layers.1.mlp"]
    assert num_params(merged) == num_params(gated_model("llama", causal_lm=True)) - gated_params_saved(
        gated_model("llama")) // 2


# ------------------------------------------------------------------------------------------- save / load


def test_gated_adapter_saved_and_loaded_gives_identical_logits(tmp_path):
    gated_model("llama", causal_lm=True).save_pretrained(tmp_path / "base")
    batch = lm_batch()

    def base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()

    peft_model = hlc.get_lora_collapse_model(base(), random_lora(["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    set_alphas(peft_model, 0.3, 1.0)
    constants = set_gate_constants(peft_model)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    keys = sorted(k for k in saved if k.endswith("layercollapse_gate_constant"))
    assert keys == [f"base_model.model.model.layers.{i}.mlp.act_fn.layercollapse_gate_constant" for i in (0, 1)]
    for key, name in zip(keys, constants):
        torch.testing.assert_close(saved[key], constants[name], rtol=0, atol=0)

    loaded = PeftModel.from_pretrained(base(), tmp_path / "adapter")
    assert torch.equal(logits(loaded, batch), expected)
    for name, act in hlc.injected_activations(loaded).items():
        torch.testing.assert_close(gate_of(act).data, constants[name], rtol=0, atol=0)
        assert not gate_of(act).requires_grad  # inference by default
    trainable = PeftModel.from_pretrained(base(), tmp_path / "adapter", is_trainable=True)
    assert trainable_kinds(trainable) == trainable_kinds(peft_model)
    on_meta_first = PeftModel.from_pretrained(base(), tmp_path / "adapter", low_cpu_mem_usage=True)
    assert torch.equal(logits(on_meta_first, batch), expected)

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(auto, batch), expected)
    merged = auto.merge_and_unload()
    assert [b.name for b in auto.base_model.collapse_report.collapsed] == ["model.layers.1.mlp"]
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert max_rel_diff([logits(reloaded, batch)], [expected]) < 1e-5
    (kept,) = hlc.injected_activations(reloaded).values()
    torch.testing.assert_close(gate_of(kept).data, constants["base_model.model.model.layers.0.mlp"], rtol=0,
                               atol=0)
    assert kept.alpha_value == pytest.approx(0.3)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_gate_constant_of_the_wrong_size_in_an_adapter_is_an_error(tmp_path, low_cpu_mem_usage):
    peft_model = get_peft_model(gated_model("llama", causal_lm=True), hlc.LayerCollapseConfig())
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    weights = load_file(path)
    key = "base_model.model.model.layers.1.mlp.act_fn.layercollapse_gate_constant"
    weights[key] = torch.zeros(H + 3)
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(hlc.LayerCollapseConfigError,
                       match=r"gate_constant of 'base_model\.model\.model\.layers\.1\.mlp\.act_fn'.*\(67,\).*\(64,\)"):
        PeftModel.from_pretrained(gated_model("llama", causal_lm=True), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)


# ------------------------------------------------------------------------------------------------ trainer


def test_trainer_trains_alpha_and_gate_constant_through_the_peft_model_and_collapses(tmp_path):
    model = gated_model("llama", causal_lm=True)
    params_original, saving = num_params(model), gated_params_saved(gated_model("llama"))
    peft_model = hlc.get_lora_collapse_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               task_type="CAUSAL_LM"),
                                             hlc.LayerCollapseConfig(reg_weight=5.0))
    acts = hlc.injected_activations(peft_model)
    start = {n: (a.alpha_value, gate_of(a).detach().clone()) for n, a in acts.items()}
    generator = torch.Generator().manual_seed(1)
    data = []
    for _ in range(16):
        ids = torch.randint(1, 99, (8,), generator=generator)
        data.append({"input_ids": ids, "labels": ids.clone()})
    args = TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=1)
    trainer = hlc.LayerCollapseTrainer(model=peft_model, args=args, train_dataset=data,
                                       collapse_args=hlc.CollapseArguments(alpha_learning_rate=0.5))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    for name, act in acts.items():
        alpha, constant = start[name]
        assert alpha == 0.0 and act.alpha_value == 1.0  # pulled 0 → 1 (clamped) with α's own learning rate
        moved = float((gate_of(act).detach() - constant).abs().max())
        assert 1e-3 < moved < 0.1, name  # c trained at the model's learning rate (4 Adam steps of 1e-2)
    lora_b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert float(lora_b.abs().sum()) > 0  # LoRA B started at zero and trained
    batch = lm_batch()
    expected = logits(peft_model.eval(), batch)

    report = trainer.collapse_and_save()
    assert len(report.collapsed) == 2 and no_peft_left(trainer.model)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert max_abs_diff([logits(saved, batch)], [logits(trainer.model.eval(), batch)]) == 0.0
    assert max_rel_diff([logits(saved, batch)], [expected]) < 1e-5
    assert num_params(saved) == params_original - saving


# ------------------------------------------------------------------------------------------- bad input


def test_gated_blocks_refuse_prelu_and_moe_models_are_refused_by_peft():
    with pytest.raises(ValueError, match=r"activation='prelu' cannot be used on gated MLP blocks"):
        get_peft_model(tiny_model("llama"), hlc.LayerCollapseConfig(activation="prelu"))
    config = AutoConfig.for_model("mixtral", **TEXT, num_key_value_heads=HEADS, num_local_experts=4,
                                  num_experts_per_tok=2)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        get_peft_model(AutoModel.from_config(config), hlc.LayerCollapseConfig())
    with pytest.raises(TypeError, match="PeftModel with a LayerCollapse adapter"):
        hlc.calibrate_linear_targets(tiny_model("llama"), lm_batches())
    with pytest.raises(ValueError, match="no gated MLP block"):
        hlc.calibrate_linear_targets(get_peft_model(tiny_model("bert"), hlc.LayerCollapseConfig()), lm_batches())
