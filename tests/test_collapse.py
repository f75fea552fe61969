"""Exact merging (`merge_projections`), `collapse_model` on the tiny grid and on the real all-MiniLM-L6-v2, and
the `CollapseReport`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    D,
    collapse_all,
    expected_blocks,
    make_inputs,
    max_rel_diff,
    num_params,
    outputs,
    saved_per_block,
    set_alphas,
    tiny_model,
)
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel
from transformers.pytorch_utils import Conv1D

import hf_layercollapse as hlc
from hf_layercollapse.modules import projection_from
from hf_layercollapse.record import RECORD_KEY

# ------------------------------------------------------------------------------------ merge_projections


def projection(kind: str, d_in: int, d_out: int, bias: bool, dtype=torch.float64) -> nn.Module:
    module = nn.Linear(d_in, d_out, bias=bias) if kind == "linear" else Conv1D(d_out, d_in)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    if kind == "conv1d" and not bias:
        module.bias = None  # merge_projections must treat a missing bias as zero
    return module.to(dtype)


def as_matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` weight and bias (zeros when absent) in fp64, read straight from the parameters."""
    weight = module.weight.detach().double()
    weight = weight.t() if isinstance(module, Conv1D) else weight
    zeros = torch.zeros(weight.shape[0], dtype=torch.float64)
    bias = module.bias.detach().double() if module.bias is not None else zeros
    return weight, bias


def reference(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w1, b1 = as_matrix(fc1)
    w2, b2 = as_matrix(fc2)
    return (x.double() @ w1.t() + b1) @ w2.t() + b2


KINDS = [("linear", "linear"), ("conv1d", "conv1d"), ("linear", "conv1d"), ("conv1d", "linear")]


@pytest.mark.parametrize(("kind1", "kind2"), KINDS)
@pytest.mark.parametrize(("bias1", "bias2"), [(True, True), (True, False), (False, True), (False, False)])
def test_merge_projections_is_exact(kind1, kind2, bias1, bias2):
    torch.manual_seed(0)
    fc1 = projection(kind1, 6, 20, bias1)
    fc2 = projection(kind2, 20, 5, bias2)
    merged = merge_projections_checked(fc1, fc2)
    x = torch.randn(7, 6, dtype=torch.float64)
    expected = reference(fc1, fc2, x)
    w, b = as_matrix(merged)
    torch.testing.assert_close(x @ w.t() + b, expected, rtol=1e-12, atol=1e-12)
    if kind2 == "linear":
        assert (merged.bias is not None) == (bias1 or bias2)  # no bias invented for bias-free blocks
    if bias1 and bias2 and kind1 == kind2:
        torch.testing.assert_close(merged(x), fc2(fc1(x)), rtol=1e-12, atol=1e-12)  # the modules' own forward


def merge_projections_checked(fc1, fc2):
    merged = hlc.merge_projections(fc1, fc2)
    assert isinstance(merged, Conv1D if isinstance(fc2, Conv1D) else nn.Linear)  # same family as fc2
    assert merged.weight.dtype == fc2.weight.dtype
    d_in = fc1.weight.shape[0] if isinstance(fc1, Conv1D) else fc1.in_features
    d_out = fc2.weight.shape[1] if isinstance(fc2, Conv1D) else fc2.out_features
    assert tuple(as_matrix(merged)[0].shape) == (d_out, d_in)
    return merged


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_projections_fp32_matches_fp64(kind):
    torch.manual_seed(0)
    fc1, fc2 = projection(kind, 32, 128, True, torch.float32), projection(kind, 128, 32, True, torch.float32)
    merged = hlc.merge_projections(fc1, fc2)
    x = torch.randn(16, 32)
    expected = reference(fc1, fc2, x)
    with torch.no_grad():
        got = merged(x).double()
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_map_without_a_bias_computes_w_x(kind):
    """A fitted map may come without a bias; a Conv1D always has one, and it must then be zero, not whatever
    memory the uninitialised projection was given."""
    torch.manual_seed(0)
    like = projection(kind, 8, 4, True, torch.float32)
    weight, x = torch.randn(4, 8), torch.randn(3, 8)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # uninitialised memory is then filled with NaN: a bias left so shows
    try:
        merged = projection_from(like, weight, None)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), x @ weight.T, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_projections_low_precision_is_rounded_fp64(dtype, kind):
    """The product is taken in fp32 and rounded once to the block's dtype: within one rounding of fp64."""
    torch.manual_seed(0)
    fc1 = projection(kind, 32, 128, True, dtype)
    fc2 = projection(kind, 128, 32, True, dtype)
    merged = hlc.merge_projections(fc1, fc2)
    assert merged.weight.dtype == dtype and merged.bias.dtype == dtype
    w1, b1 = as_matrix(fc1)
    w2, b2 = as_matrix(fc2)
    eps = torch.finfo(dtype).eps
    for got, exact in ((as_matrix(merged)[0], w2 @ w1), (as_matrix(merged)[1], w2 @ b1 + b2)):
        # rounding to nearest: |error| ≤ eps/2 · |value| (plus a sliver for fp32 accumulation)
        assert torch.all((got - exact).abs() <= 0.5 * eps * exact.abs() + 1e-4 * eps * exact.abs().max())


# --------------------------------------------------------------------------------- collapse on the grid


def test_collapse_changes_structure_as_documented():
    model = tiny_model("bert")
    collapse_all(model)
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, nn.Identity)
    assert isinstance(layer.intermediate.intermediate_act_fn, nn.Identity)
    assert isinstance(layer.output.dense, nn.Linear) and layer.output.dense.weight.shape == (D, D)
    gpt2 = tiny_model("gpt2")
    collapse_all(gpt2)
    assert isinstance(gpt2.h[0].mlp.c_proj, Conv1D) and gpt2.h[0].mlp.c_proj.weight.shape == (D, D)


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "whisper"])
def test_partial_collapse_keeps_the_rest_exact(name):
    model = tiny_model(name)
    inputs = make_inputs(model)
    hlc.get_collapse_model(model)
    alphas = [1.0] + [0.4] * (expected_blocks(name) - 1)
    set_alphas(model, *alphas)
    before = outputs(model, inputs)
    report = hlc.collapse_model(model)
    assert [b.status for b in report.blocks] == ["collapsed"] + ["kept"] * (len(alphas) - 1)
    assert max_rel_diff(outputs(model, inputs), before) <= 1e-5
    kept = hlc.injected_activations(model)
    assert [a.alpha_value for a in kept.values()] == pytest.approx([0.4] * (len(alphas) - 1))


def narrow_bert(intermediate: int) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=99, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=intermediate, max_position_embeddings=64)).eval()


@pytest.mark.parametrize(("intermediate", "status"), [(4, "skipped"), (15, "skipped"), (16, "collapsed")])
def test_blocks_that_would_grow_are_skipped(intermediate, status):
    """Merging pays only when 2·d·h + h + d > d·d + d, i.e. h > 15.75 for d = 32."""
    model = narrow_bert(intermediate)
    inputs = make_inputs(model)
    hlc.get_collapse_model(model)
    set_alphas(model, 1.0)
    before, params = outputs(model, inputs), num_params(model)
    report = hlc.collapse_model(model)
    assert [b.status for b in report.blocks] == [status, status]
    assert max_rel_diff(outputs(model, inputs), before) <= 1e-5
    if status == "skipped":
        assert all("not save" in b.reason for b in report.blocks)
        assert num_params(model) == params and report.params_saved == 0
        assert len(hlc.injected_activations(model)) == 2  # still injected, still exact
    else:
        assert params - 2 - num_params(model) == 2 * saved_per_block(D, intermediate, bias=True) == 2 * 16


def test_named_block_far_from_one_raises_unless_forced():
    model = tiny_model("bert")
    inputs = make_inputs(model)
    hlc.get_collapse_model(model)
    set_alphas(model, 0.3, 1.0)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0 \(α=0\.3000\)"):
        hlc.collapse_model(model, blocks=["layer.0"])
    assert len(hlc.injected_activations(model)) == 2  # nothing was merged

    # forcing merges the linear part only: the result equals the model with α = 1 on that block
    set_alphas(model, 1.0, 1.0)
    linear = outputs(model, inputs)
    set_alphas(model, 0.3, 1.0)
    report = hlc.collapse_model(model, blocks=["layer.0"], force=True)
    assert [(b.name, b.status) for b in report.blocks] == [("encoder.layer.0", "collapsed"),
                                                           ("encoder.layer.1", "kept")]
    assert report.blocks[0].alpha == pytest.approx(0.3)
    assert report.blocks[1].reason == "not selected"
    assert max_rel_diff(outputs(model, inputs), linear) <= 1e-5
    assert getattr(model.config, RECORD_KEY)["blocks"]["encoder.layer.0"]["alpha"] == pytest.approx(0.3)


def test_unnamed_far_blocks_are_kept():
    model = tiny_model("gpt2")
    inputs = make_inputs(model)
    hlc.get_collapse_model(model)
    set_alphas(model, 0.5, 0.97)
    before = outputs(model, inputs)
    report = hlc.collapse_model(model)  # threshold 0.05 from the config
    assert [(b.name, b.status) for b in report.blocks] == [("h.0.mlp", "kept"), ("h.1.mlp", "collapsed")]
    assert "0.5" in report.blocks[0].reason
    assert report.threshold == 0.05
    assert list(hlc.injected_activations(model)) == ["h.0.mlp"]
    # h.1 had α = 0.97: merging drops 3% of its non-linear part, so outputs move, but only a little
    assert 0 < max_rel_diff(outputs(model, inputs), before) < 0.1


def test_threshold_from_config_and_argument():
    model = tiny_model("bert")
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(threshold=0.2))
    set_alphas(model, 0.85, 0.75)
    assert [b.status for b in hlc.collapse_model(model, threshold=0.1).blocks] == ["kept", "kept"]
    assert [b.status for b in hlc.collapse_model(model).blocks] == ["collapsed", "kept"]  # τ = 0.2 from the config
    with pytest.raises(ValueError, match="threshold=2"):
        hlc.collapse_model(model, threshold=2)


def test_collapse_errors():
    with pytest.raises(ValueError, match="no collapsible activations"):
        hlc.collapse_model(tiny_model("bert"))
    model = tiny_model("bart")
    hlc.get_collapse_model(model)
    set_alphas(model, 1.0)
    with pytest.raises(ValueError, match="matches no injected block"):
        hlc.collapse_model(model, blocks=["layers.7"])
    with pytest.raises(ValueError, match="ambiguous"):
        hlc.collapse_model(model, blocks=["layers.0"])  # encoder.layers.0 and decoder.layers.0
    assert len(hlc.injected_activations(model)) == 4  # nothing merged
    report = hlc.collapse_model(model, blocks=["decoder.layers.0"])
    assert [b.status for b in report.blocks] == ["kept", "kept", "collapsed", "kept"]


def test_report_table_and_dict():
    model = tiny_model("bart")
    hlc.get_collapse_model(model)
    set_alphas(model, 1.0, 0.2, 1.0, 0.99)
    before = num_params(model) - 4  # the report counts the original architecture: no α
    report = hlc.collapse_model(model)
    after = num_params(model) - 1  # the kept block still has its α
    text = str(report)
    for block in report.blocks:
        assert block.name in text
    assert "collapsed (" not in text and "kept (" in text
    assert f"{before:,} -> {after:,}" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["params_saved"] == before - after == report.params_saved
    assert data["num_collapsed"] == 3 and data["model_params_before"] == before
    assert [b["status"] for b in data["blocks"]] == ["collapsed", "kept", "collapsed", "collapsed"]
    assert data["params_saved_fraction"] == pytest.approx((before - after) / before)
    per_block = sum(b["params_before"] - b["params_after"] for b in data["blocks"])
    assert data["params_saved"] == per_block
    flops = [b for b in data["blocks"] if b["status"] == "collapsed"]
    assert data["collapsed_flops_per_token_before"] == sum(b["flops_before"] for b in flops) == 3 * 2 * 2 * D * 64
    assert data["collapsed_flops_per_token_after"] == 3 * 2 * D * D


def test_collapse_in_half_precision():
    model = tiny_model("opt").to(torch.bfloat16)
    inputs = make_inputs(model)
    hlc.get_collapse_model(model)
    set_alphas(model, 1.0)
    before = outputs(model, inputs)
    hlc.collapse_model(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert max_rel_diff(outputs(model, inputs), before) <= 2e-2  # bf16 has an 8-bit mantissa


# ------------------------------------------------------------------------------ the real MiniLM-L6-v2

SENTENCES = [
    "LayerCollapse merges the two projections of an MLP block once its activation has become linear.",
    "Short one.",
    "Tokenisers pad the shorter sentences, and the attention mask hides the padding from the model!",
]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(minilm_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    return model, tokenizer


def test_minilm_collapse_all_six_blocks(minilm):
    model, tokenizer = minilm
    assert model.config.hidden_size == 384 and model.config.intermediate_size == 1536
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].eq(0).any()  # real padding is exercised
    params = num_params(model)
    with torch.no_grad():
        original = model(**batch).last_hidden_state
    hlc.get_collapse_model(model)
    with torch.no_grad():
        assert float((model(**batch).last_hidden_state - original).abs().max()) <= 1e-6
    set_alphas(model, 1.0)
    with torch.no_grad():
        linear = model(**batch).last_hidden_state
    report = hlc.collapse_model(model)
    with torch.no_grad():
        collapsed = model(**batch).last_hidden_state
    assert len(report.collapsed) == 6
    assert float((collapsed - linear).abs().max() / linear.abs().max()) <= 1e-5
    assert params - num_params(model) == 6 * (2 * 384 * 1536 + 1536 - 384 * 384)
    assert report.params_saved == 6 * (2 * 384 * 1536 + 1536 - 384 * 384)


def _up_first_phi3():
    """A Phi-3 whose MLP splits its fused projection up-first (as Aya Vision, Moonshine and CLVP do), where the
    library's gated layout assumes Phi-3's gate-first order."""
    import types

    config = AutoConfig.for_model("phi3", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, intermediate_size=48, pad_token_id=0, eos_token_id=1,
                                  bos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()

    def forward(self, hidden_states):
        up, gate = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))

    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(forward, layer.mlp)
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(), example_inputs={"input_ids": torch.tensor([[1, 2, 3]])})
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    return model


def test_an_inexact_merge_is_refused_and_the_model_left_as_it_was():
    model = _up_first_phi3()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    reference = model(x).logits
    params = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp' \(max \|difference\|.*Nothing was merged"):
        hlc.collapse_model(model)
    assert sum(p.numel() for p in model.parameters()) == params
    assert torch.equal(model(x).logits, reference)  # every unit restored, α = 1 kept
    assert len(hlc.injected_activations(model)) == 2
    hlc.collapse_model(model, verify=False)  # unchecked, the merge is silently wrong: what the check prevents
    assert (model(x).logits - reference).abs().max() > 1e-4


def test_the_merge_check_holds_after_bf16_mixed_precision_training():
    """Trainer's bf16 mixed precision leaves an autocast wrapper on ``model.forward``: the probe's forward runs in
    bf16, but the check compares the module replayed alone before and after merging (fp32 both), so exact merges
    pass and an inexact one is still refused."""
    model = tiny_model("llama")
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig())
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    inputs = make_inputs(model)
    expected = outputs(model, inputs)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)  # what accelerate does
    report = hlc.collapse_model(model)
    assert len(report.collapsed) == len(report.blocks) == 2
    del model.forward
    assert max_rel_diff(outputs(model, inputs), expected) < 1e-5
    wrong = _up_first_phi3()
    wrong.forward = torch.autocast("cpu", dtype=torch.bfloat16)(wrong.forward)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp' \(max \|difference\|.*Nothing was merged"):
        hlc.collapse_model(wrong)


def test_verification_restores_alpha_and_training_mode():
    model = tiny_model("llama")
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig())
    acts = list(hlc.injected_activations(model).values())
    acts[0].alpha.data.fill_(1.0)
    acts[1].alpha.data.fill_(0.3)
    model.train()
    report = hlc.collapse_model(model, threshold=0.05)
    assert [b.status for b in report.blocks] == ["collapsed", "kept"]
    assert model.training and acts[1].alpha_value == pytest.approx(0.3)


@pytest.mark.parametrize("model_type", ["xglm", "mvp"])
def test_the_merge_check_replays_layers_without_their_cache(model_type):
    # the probe's first pass fills the KV cache; a replay that reused it saw twice the keys (a mask-shape error)
    config = AutoConfig.for_model(model_type, vocab_size=99, d_model=32, num_layers=2, decoder_layers=2,
                                  encoder_layers=2, attention_heads=2, decoder_attention_heads=2,
                                  encoder_attention_heads=2, ffn_dim=37, decoder_ffn_dim=37, encoder_ffn_dim=37,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    model = hlc.get_collapse_model(AutoModel.from_config(config).eval())
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    inputs = make_inputs(model)
    expected = outputs(model, inputs)
    report = hlc.collapse_model(model)
    assert len(report.collapsed) == len(report.blocks) > 0
    assert max_rel_diff(outputs(model, inputs), expected) < 1e-5


def test_the_tracer_leaves_out_fused_blocks_whose_gate_is_the_second_half():
    config = AutoConfig.for_model("phi3", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, intermediate_size=48, pad_token_id=0, eos_token_id=1,
                                  bos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    inputs = {"input_ids": torch.tensor([[1, 2, 3]])}
    traced = hlc.find_mlp_blocks(model, inputs, method="trace")  # Phi-3's own order: gate first
    assert [u.name for u in traced] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert hlc.find_mlp_blocks(_up_first_phi3(), inputs, method="trace") == []  # up first: not read as gate first


def test_the_checks_leave_the_random_stream_alone():
    model = tiny_model("vit")  # its probe inputs are random pixels
    torch.manual_seed(3)
    hlc.get_collapse_model(model)
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    hlc.collapse_model(model)
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))
