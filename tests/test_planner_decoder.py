"""The one-pass planner for decoder LLMs (``OnePassSearch``): its measurements equal the applied model's, plans with
spans save, load and apply (a stock checkpoint when they cut layers only), MLP blocks and spans combine with the
record renumbered, a plan refuses another model's weights, and the sums behind it are exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import HEADS, TEXT
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertModel

import hf_layercollapse as hlc
from hf_layercollapse.errors import LayerCollapseConfigError
from hf_layercollapse.planner import CollapsePlan, Objective, OnePassSearch, PlannedBlock
from hf_layercollapse.statistics import ResidualFitStats
from hf_layercollapse.units import GatedLayout, SpanLayout


def decoder(layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", **{**TEXT, "num_hidden_layers": layers}, num_key_value_heads=HEADS)
    return AutoModelForCausalLM.from_config(config).eval()


def batches(n: int = 8, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 99, (4, 16), generator=generator)} for _ in range(n)]


def layer_params(model) -> int:
    return sum(p.numel() for p in model.model.layers[0].parameters())


def test_the_plan_meets_the_budget_and_its_measurement_is_the_applied_models():
    model, data = decoder(), batches()
    budget = 2 * layer_params(model)
    plan = hlc.plan_collapse(model, data, num_params=budget, units="mlp,layer,span", show_progress=False)
    assert plan.params_saved >= budget and plan.selected
    assert {b.layout.kind.value for b in plan.candidates} == {"gated", "span"}
    assert all("relative_error" in b.quality for b in plan.candidates)
    assert plan.alternatives and all(d != "" for d in plan.alternatives)
    verified = [dict(b) for b in data[4:6]]  # the planner measures on the first 2 held-out batches
    reference = Objective(model, copy.deepcopy(verified))()
    params = sum(p.numel() for p in model.parameters())
    report = hlc.collapse_model(model, plan=plan)
    assert params - sum(p.numel() for p in model.parameters()) == plan.params_saved == report.params_saved
    assert Objective(model, copy.deepcopy(verified))() - reference == pytest.approx(plan.measured_cost, abs=1e-5)


def test_a_plan_of_spans_saves_loads_and_gives_a_stock_checkpoint(tmp_path):
    model, data = decoder(), batches()
    plan = hlc.plan_collapse(model, data, num_params=2 * layer_params(model), units="layer,span",
                             show_progress=False)
    assert all(isinstance(b.layout, SpanLayout) for b in plan.selected)
    twin = copy.deepcopy(model)
    plan.save(tmp_path / "plan")
    loaded = CollapsePlan.load(tmp_path / "plan")
    assert [b.name for b in loaded.selected] == [b.name for b in plan.selected]
    assert all(b.fingerprint for b in loaded.selected)
    hlc.collapse_model(model, plan=plan)
    hlc.collapse_model(twin, plan=loaded)
    ids = data[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "llama" and "layercollapse" not in config
    assert config["num_hidden_layers"] == 6 - sum(b.layout.length for b in plan.selected)
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_plan_refuses_another_models_weights():
    model, data = decoder(), batches()
    plan = hlc.plan_collapse(model, data, num_params=layer_params(model), units="layer", show_progress=False)
    other = decoder(seed=1)  # the same architecture, other weights
    with pytest.raises(LayerCollapseConfigError, match="fitted on other weights"):
        hlc.collapse_model(other, plan=plan)
    assert other.config.num_hidden_layers == 6
    with torch.no_grad():  # the model it was made for, changed since (fine-tuned, say)
        next(model.model.layers[plan.selected[0].layout.start].parameters()).mul_(1.01)
    with pytest.raises(LayerCollapseConfigError, match="fingerprint"):
        hlc.collapse_model(model, plan=plan)


def test_mlp_blocks_and_spans_combine_and_the_record_follows_the_renumbered_layers(tmp_path):
    """A span cut (layers 1-2) and a merged MLP block in layer 4 (an arbitrary map): the applied model equals the
    original with those replacements made by hooks, the record names the block by its new index (2), and the
    checkpoint reloads."""
    model = decoder()
    ids = batches(1)[0]["input_ids"]
    mlp = hlc.find_mlp_blocks(model)[4]
    assert isinstance(mlp.layout, GatedLayout)
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(32, 32, generator=generator) / 6, torch.randn(32, generator=generator) / 6
    blocks = [PlannedBlock("model.layers.1-2", SpanLayout(1, 2), "cut", {"cut": 0.0}, 1, owner="model.layers"),
              PlannedBlock(mlp.name, mlp.layout, "relative_least_squares", {"relative_least_squares": 0.0}, 1,
                           weight, bias)]
    plan = CollapsePlan(blocks, blocks, "language-modelling loss", 0.0, 0.0, 0)
    layers = model.model.layers
    handles = [layers[i].register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"],
                                               with_kwargs=True) for i in (1, 2)]
    stash = {}
    handles.append(layers[4].mlp.register_forward_pre_hook(lambda m, a: stash.__setitem__("x", a[0])))
    handles.append(layers[4].mlp.register_forward_hook(lambda m, a, o: stash["x"] @ weight.T + bias))
    with torch.no_grad():
        expected = model(ids).logits
    for handle in handles:
        handle.remove()
    report = hlc.collapse_model(model, plan=plan)
    assert [r.name for r in report.collapsed] == ["model.layers.1-2", "model.layers.2.mlp"]
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5
    assert list(model.config.layercollapse["blocks"]) == ["layers.2.mlp"]
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits, got,
                                   rtol=1e-5, atol=1e-5)


def test_bad_input_to_the_one_pass_planner():
    model, data = decoder(), batches()
    with pytest.raises(ValueError, match="units="):
        hlc.plan_collapse(model, data, num_params=1000, units="mlp,block", show_progress=False)
    with pytest.raises(ValueError, match="budget in parameters"):
        hlc.plan_collapse(model, data, num_blocks=1, units="span", show_progress=False)
    with pytest.raises(ValueError, match="cannot be met"):
        hlc.plan_collapse(model, data, num_params=10**9, units="span", show_progress=False)
    bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64)).eval()
    with pytest.raises(ValueError, match="decoder layers"):
        hlc.plan_collapse(bert, data, num_params=1000, units="span", search=OnePassSearch(), show_progress=False)


def test_residual_fit_sums_give_the_weighted_least_squares_map_and_its_error():
    torch.manual_seed(0)
    x, y, w = torch.randn(300, 6), torch.randn(300, 4), torch.rand(300) + 0.5
    stats = ResidualFitStats(6, 4, 1, torch.device("cpu"), bias=True)
    for i in range(0, 300, 100):
        stats.update(x[i:i + 100], [y[i:i + 100]], w[i:i + 100])
    design = torch.cat([x, torch.ones(300, 1)], 1).double()
    root = w.double().sqrt()[:, None]
    expected = torch.linalg.lstsq(root * design, root * y.double()).solution
    torch.testing.assert_close(stats.solve(0, 0.0), expected, rtol=1e-5, atol=1e-6)
    prior = torch.randn(7, 4, dtype=torch.float64)
    plain = ResidualFitStats(6, 4, 1, torch.device("cpu"))  # without a bias row, one eigendecomposition is exact
    plain.update(x, [y], w)
    for ridge, path in zip((0.01, 1.0), plain.ridge_path(0, [0.01, 1.0], prior[:6])):
        torch.testing.assert_close(path, plain.solve(0, ridge, prior[:6]), rtol=1e-6, atol=1e-8)
    error = float((w.double() * ((design @ prior) - y.double()).pow(2).sum(1)).sum()) / 300
    assert stats.error(0, prior) == pytest.approx(error, rel=1e-5)
