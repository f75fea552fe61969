"""Gated MLP blocks (Llama, Mistral, Qwen2, Gemma, Phi-3, gated T5): constant-gate injection, exact collapse,
checkpoints, training, the planner, bad input, and the real SmolLM2-135M."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import HEADS, TEXT, gated_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import hf_layercollapse as hlc
from hf_layercollapse.calibration import collect_statistics, fit_targets, statistics_passes
from hf_layercollapse.merging import merge_gated
from hf_layercollapse.statistics import GateRequest, LeastSquaresRequest
from hf_layercollapse.targets import GateConstant


def gate_constants(model, blocks, batches, method: str = "mean", ridge: float = 1e-4) -> dict[str, torch.Tensor]:
    """Each block's constant gate ``c`` fitted by ``method`` (the GateConstant target's fit)."""
    fitted = fit_targets(model, {b: GateConstant(method, ridge) for b in blocks}, batches)
    return {name: tensors["gate_constant"] for name, tensors in fitted.items()}


def output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_gated_casts_back_within_dtype_tolerance(dtype):
    torch.manual_seed(0)
    up, down, c = nn.Linear(16, 48, bias=True), nn.Linear(48, 16, bias=True), torch.randn(48)
    x = torch.randn(5, 16, dtype=torch.float64)
    reference = down.double()(c.double() * up.double()(x))
    merged = merge_gated(up.to(dtype), down.to(dtype), c)
    assert merged.weight.dtype == dtype
    tolerance = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(merged.double()(x), reference, atol=tolerance, rtol=tolerance)


def test_partial_collapse_saves_injected_gate_constants_and_generates(tmp_path):
    model = gated_model("llama", causal_lm=True)
    hlc.get_collapse_model(model)
    acts = hlc.injected_activations(model)
    first, last = list(acts)
    acts[last].alpha.data.fill_(1.0)
    acts[first].alpha.data.fill_(0.4)
    acts[first].gate_constant.data.uniform_(-1, 1)
    hlc.collapse_model(model)
    ids = torch.tensor([[1, 5, 9, 3]])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again = hlc.injected_activations(reloaded)
    assert list(again) == [first]
    torch.testing.assert_close(again[first].gate_constant, acts[first].gate_constant, atol=0, rtol=0)
    assert again[first].alpha_value == pytest.approx(0.4)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(reloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)


def test_gate_constant_starts_at_the_calibration_mean():
    model = gated_model("llama")
    batches = [{"input_ids": torch.randint(1, 99, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}]
    batches[0]["attention_mask"][0, 4:] = 0  # padding is left out of the mean
    block = hlc.find_mlp_blocks(model)[0]
    captured = []
    handle = model.get_submodule(block.path("act")).register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(**batches[0])
    handle.remove()
    keep = batches[0]["attention_mask"].reshape(-1).bool()
    expected = captured[0].reshape(-1, captured[0].shape[-1])[keep].double().mean(0).float()
    hlc.get_collapse_model(model, calibration_data=batches)
    act = hlc.injected_activations(model)[block.name]
    torch.testing.assert_close(act.gate_constant.data, expected, atol=1e-6, rtol=1e-6)


def _block_tensors(model, block, batches):
    """(u, g, y) of every unpadded token: up projection, gate activation and the block's output."""
    owner = model.get_submodule(block.name)
    captured = {"u": [], "g": [], "y": []}
    fused = block.layout.fused  # Phi-3's gate_up_proj: [gate | up]

    def up(module, args, out):
        captured["u"].append(out.chunk(2, dim=-1)[1] if fused else out)

    hooks = [owner.get_submodule(block.layout.up).register_forward_hook(up),
             owner.get_submodule(block.layout.act).register_forward_hook(lambda m, a, o: captured["g"].append(o)),
             owner.get_submodule(block.layout.down).register_forward_hook(lambda m, a, o: captured["y"].append(o))]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for hook in hooks:
        hook.remove()
    keep = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    return [torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[k]])[keep].double() for k in "ugy"]


@pytest.mark.parametrize("name", ["qwen2", "phi3"])
def test_least_squares_gate_constant_is_the_minimiser_of_the_relative_output_error(name):
    model = gated_model(name)
    batches = [{"input_ids": torch.randint(1, 99, (3, 9), generator=torch.Generator().manual_seed(i)),
                "attention_mask": torch.ones(3, 9, dtype=torch.long)} for i in range(2)]
    batches[0]["attention_mask"][1, 5:] = 0
    block = hlc.find_mlp_blocks(model)[1]
    down = model.get_submodule(block.path("output"))
    u, g, y = _block_tensors(model, block, batches)
    w = down.weight.double()
    # the dense least-squares problem: every token gives d equations W·diag(u_t)·c = W·(g_t ⊙ u_t), scaled by
    # 1/rms(y_t) (relative error)
    scale = y.pow(2).mean(1).rsqrt()
    design = torch.cat([s_t * w * u_t for s_t, u_t in zip(scale, u)])
    target = torch.cat([s_t * w @ (g_t * u_t) for s_t, g_t, u_t in zip(scale, g, u)])
    expected = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
    fitted = gate_constants(model, [block], batches, method="least_squares", ridge=0.0)[block.name]
    torch.testing.assert_close(fitted.double(), expected, atol=1e-4, rtol=1e-4)
    mean = gate_constants(model, [block], batches)[block.name]
    torch.testing.assert_close(mean.double(), g.mean(0), atol=1e-6, rtol=1e-6)

    def error(c):
        with torch.no_grad():
            return float(((down((u * c.double()).float()).double() - y).pow(2).mean(1) * scale.pow(2)).sum())

    assert error(fitted) < error(mean)


def test_statistics_beyond_the_memory_budget_take_more_passes_with_the_same_sums():
    model = gated_model("llama", causal_lm=True)
    blocks = hlc.find_mlp_blocks(model)
    batches = [{"input_ids": torch.randint(1, 99, (2, 6), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    wanted = [LeastSquaresRequest(relative=False), LeastSquaresRequest(relative=True), GateRequest(fit=True)]
    requests = {block: wanted for block in blocks}
    assert len(statistics_passes(model, requests)) == 1 and len(statistics_passes(model, requests, memory=1)) == 2
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    one, split = collect_statistics(model, requests, batches), collect_statistics(model, requests, batches, memory=1)
    handle.remove()
    assert len(calls) == 3 * len(batches)  # one pass, then one pass per block
    for block in blocks:
        for request in wanted[:2]:
            assert torch.equal(one[block.name][request].gram, split[block.name][request].gram)
        assert torch.equal(one[block.name][wanted[2]].up_cross, split[block.name][wanted[2]].up_cross)


@pytest.mark.parametrize("name", ["llama", "phi3", "t5-gated"])
def test_fitted_linear_target_starts_c_at_its_least_squares_fit(name):
    batches = [{"input_ids": torch.randint(1, 99, (3, 7), generator=torch.Generator().manual_seed(i)),
                "attention_mask": torch.ones(3, 7, dtype=torch.long)} for i in range(2)]
    if name == "t5-gated":  # encoder-decoder: the decoder's gated blocks are fitted on its own tokens
        for batch in batches:
            batch["decoder_input_ids"] = batch["input_ids"].flip(1)
    model = gated_model(name)
    blocks = hlc.find_mlp_blocks(model)
    expected = gate_constants(model, blocks, batches, method="least_squares")
    means = gate_constants(model, blocks, batches)
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(linear_target="fitted"), calibration_data=batches)
    for block_name, act in hlc.injected_activations(model).items():
        torch.testing.assert_close(act.gate_constant.data, expected[block_name], rtol=0, atol=0)
        assert (expected[block_name] - means[block_name]).abs().max() > 1e-3


def test_trainer_learns_alpha_and_the_gate_constant(tmp_path):
    model = gated_model("llama", causal_lm=True)
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(reg_weight=1.0))
    constants = {n: a.gate_constant.detach().clone() for n, a in hlc.injected_activations(model).items()}
    data = [{"input_ids": torch.randint(1, 99, (8,)), "labels": torch.randint(1, 99, (8,))} for _ in range(8)]
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", disable_tqdm=True, use_cpu=True, learning_rate=1e-2)
    hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=data,
                             collapse_args=hlc.CollapseArguments(alpha_learning_rate=0.1)).train()
    for name, act in hlc.injected_activations(model).items():
        assert act.alpha_value > 0.1
        assert not torch.equal(act.gate_constant.detach(), constants[name])


def test_planner_on_gated_blocks_keeps_the_better_candidate():
    model = gated_model("llama", causal_lm=True)
    batches = [{"input_ids": torch.randint(1, 99, (4, 10), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    plan = hlc.plan_collapse(model, batches, num_blocks=1, show_progress=False)
    assert plan.objective == "language-modelling loss"
    for candidate in plan.candidates:
        assert set(candidate.costs) == {"constant_gate", "fitted_gate", "least_squares", "relative_least_squares"}
        assert candidate.cost == candidate.costs[candidate.method] == min(candidate.costs.values())
    ids = batches[0]["input_ids"]
    report = hlc.collapse_model(model, plan=plan)
    assert len(report.collapsed) == 1 and report.blocks[0].kind == "gated"
    assert torch.isfinite(model(ids).logits).all()


def test_a_gate_fixed_by_the_planner_adds_no_bias():
    """Llama's projections have no bias: a block merged with its gate fixed (constant or fitted) has none either,
    and the plan counts exactly what collapsing saves (a least-squares map brings its own bias)."""
    model = gated_model("llama", causal_lm=True)
    with torch.no_grad():  # SiLU(0) = 0: the block's output is 0, every merge is exact and the simple one is kept
        model.model.layers[0].mlp.gate_proj.weight.zero_()
    batches = [{"input_ids": torch.randint(1, 99, (4, 10), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    plan = hlc.plan_collapse(model, batches, num_blocks=2, show_progress=False)
    methods = {b.name: b.method for b in plan.selected}
    assert methods["model.layers.0.mlp"] == "constant_gate"
    d, h = model.config.hidden_size, model.config.intermediate_size
    for block in plan.selected:
        has_bias = block.method.endswith("least_squares")
        assert (block.bias is not None) == has_bias
        assert block.params_saved == 3 * d * h - d * d - (d if has_bias else 0)
    params = sum(p.numel() for p in model.parameters())
    report = hlc.collapse_model(model, plan=plan)
    assert params - sum(p.numel() for p in model.parameters()) == plan.params_saved == report.params_saved


def test_plain_mlp_with_llama_names_stays_plain():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj, self.act_fn, self.down_proj = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)))

    model = nn.Sequential(Block(), Block())
    blocks = hlc.find_mlp_blocks(model, example_inputs={"input": torch.randn(2, 8)})
    assert [b.kind for b in blocks] == [hlc.BlockKind.PLAIN] * 2
    assert blocks[0].layout.fc1 == "up_proj"


def test_mixture_of_experts_is_refused():
    config = AutoConfig.for_model("mixtral", **TEXT, num_key_value_heads=HEADS, num_local_experts=4,
                                  num_experts_per_tok=2)
    model = AutoModel.from_config(config)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        hlc.get_collapse_model(model)


def test_gate_and_up_shapes_that_disagree_are_refused():
    model = gated_model("llama")
    mlp = model.layers[0].mlp
    mlp.gate_proj = nn.Linear(32, 48, bias=False)
    with pytest.raises(ValueError, match="gate_proj"):
        hlc.find_mlp_blocks(model)


def test_gate_constant_of_the_wrong_size_in_a_checkpoint_is_an_error(tmp_path):
    model = gated_model("llama")
    hlc.get_collapse_model(model)
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    key = next(k for k in weights if k.endswith("gate_constant"))
    weights[key] = torch.zeros(weights[key].numel() + 3)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match="gate_constant"):
        AutoModel.from_pretrained(tmp_path)


@pytest.mark.assets
def test_real_smollm2_two_blocks(tmp_path):
    """SmolLM2-135M-Instruct (30 gated blocks): inject the last two with Shakespeare calibration, collapse at α = 1,
    reload with AutoModelForCausalLM, same logits and generation."""
    import offline_assets as assets

    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert len(hlc.find_mlp_blocks(model)) == 30
    text = assets.load_shakespeare()["validation"]["text"][0][:4000]
    encoded = tokenizer([text[i:i + 400] for i in range(0, 2000, 400)], return_tensors="pt", padding=True,
                        truncation=True, max_length=64)
    batches = [dict(encoded)]
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids).logits
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[-2, -1]), calibration_data=batches)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=0)
        for act in hlc.injected_activations(model).values():
            act.alpha.fill_(1.0)
        linear = model(ids).logits
    report = hlc.collapse_model(model)
    assert len(report.collapsed) == 2 and report.params_saved == 2 * (3 * 576 * 1536 - 576 * 576)
    with torch.no_grad():
        collapsed = model(ids).logits
    assert (collapsed - linear).abs().max() <= 1e-5 * linear.abs().max()
    model.save_pretrained(tmp_path)
    plan = json.loads((tmp_path / "config.json").read_text())["layercollapse"]
    assert [e["state"] for e in plan["blocks"].values()] == ["collapsed", "collapsed"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, collapsed, atol=1e-5, rtol=0)
    generated = reloaded.generate(ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(generated, model.generate(ids, max_new_tokens=4, do_sample=False))


def test_the_report_rebuilt_from_the_plan_counts_the_gate_projection():
    """build_collapse_report (model cards, the CLI) must give a collapsed gated block the same numbers as
    collapse_model: the gate projection is part of what was removed."""
    model = gated_model("llama")
    hlc.get_collapse_model(model)
    _, last = hlc.injected_activations(model).values()  # the first block stays injected
    last.alpha.data.fill_(1.0)
    report = hlc.collapse_model(model)
    rebuilt = hlc.build_collapse_report(model)
    rows = [(b.name, b.status, b.params_before, b.params_after, b.flops_before, b.flops_after)
            for b in report.blocks]
    assert [(b.name, b.status, b.params_before, b.params_after, b.flops_before, b.flops_after)
            for b in rebuilt.blocks] == rows
    assert rebuilt.params_saved == report.params_saved
