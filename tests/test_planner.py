"""plan_collapse and data-aware merging: least-squares fits, budgets, cost ordering, applying and saving plans."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import hf_layercollapse as hlc
from hf_layercollapse.calibration import collect_statistics
from hf_layercollapse.errors import LayerCollapseConfigError
from hf_layercollapse.planner import Objective as _Objective
from hf_layercollapse.saving import MANIFEST_NAME, write_manifest
from hf_layercollapse.statistics import LeastSquaresRequest, LeastSquaresStats
from hf_layercollapse.units import replaced_units


def tiny_bert(layers: int = 4, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64)
    return BertModel(config).eval()


def batches(n: int = 6, seed: int = 1, vocab: int = 60) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab, (4, 10), generator=generator)} for _ in range(n)]


def test_least_squares_reproduces_the_exact_merge_of_a_linear_block():
    """At α = 1 the block is affine, so its least-squares map computes W2·W1·x + b on new inputs too. (The
    weights themselves need not match: BERT's block inputs come out of a LayerNorm and lie on a hyperplane.)"""
    model = hlc.get_collapse_model(tiny_bert(), hlc.LayerCollapseConfig(layers_to_transform=[1]))
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    block = hlc.find_mlp_blocks(model)[1]
    fc1, fc2 = model.get_submodule(block.path("input")), model.get_submodule(block.path("output"))
    requests = [LeastSquaresRequest(relative=False), LeastSquaresRequest(relative=True)]
    stats = collect_statistics(model, {block: requests}, batches(8))[block.name]
    captured = []
    handle = fc1.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        model(**batches(2, seed=7)[0])
    handle.remove()
    x = captured[0].reshape(-1, 32).double()
    exact = hlc.merge_projections(fc1, fc2)
    expected = x @ exact.weight.double().T + exact.bias.double()
    for request in requests:  # any weighting fits an affine block exactly
        weight, bias = stats[request].solve(ridge=1e-10)
        torch.testing.assert_close(x @ weight.T + bias, expected, atol=1e-5, rtol=1e-5)


def test_least_squares_statistics_stream_over_batches():
    """Accumulating batch by batch equals one fit on everything, so memory does not grow with the data."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 5), torch.randn(200, 3)
    streamed = LeastSquaresStats(5, 3, torch.device("cpu"))
    for i in range(0, 200, 50):
        streamed.update(None, x=x[i:i + 50], y=y[i:i + 50])
    weight, bias = streamed.solve(ridge=0.0)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(200, 1)], 1).double(), y.double()).solution
    torch.testing.assert_close(weight, solution[:5].T, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(bias, solution[5], atol=1e-8, rtol=1e-8)


def test_relative_least_squares_weighs_each_token_by_its_output_size():
    """The relative fit is the weighted least-squares fit with weights 1/mean(y_t²): a token whose output is 1000×
    larger counts no more than the others (in the plain fit it decides the map)."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 5), torch.randn(200, 3)
    x[0], y[0] = 1000 * x[0], -1000 * y[0]
    streamed = LeastSquaresStats(5, 3, torch.device("cpu"), relative=True)
    for i in range(0, 200, 50):
        streamed.update(None, x=x[i:i + 50], y=y[i:i + 50])
    weight, bias = streamed.solve(ridge=0.0)
    scale = y.double().pow(2).mean(1, keepdim=True).rsqrt()
    design = torch.cat([x, torch.ones(200, 1)], 1).double() * scale
    solution = torch.linalg.lstsq(design, y.double() * scale).solution
    torch.testing.assert_close(weight, solution[:5].T, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(bias, solution[5], atol=1e-8, rtol=1e-8)
    plain = LeastSquaresStats(5, 3, torch.device("cpu"))
    plain.update(None, x=x, y=y)
    plain_weight, _ = plain.solve(ridge=0.0)
    rest = torch.linalg.lstsq(torch.cat([x[1:], torch.ones(199, 1)], 1).double(), y[1:].double()).solution[:5].T
    assert (weight - rest).abs().max() < (plain_weight - rest).abs().max()


def _single_block_cost(model, plan_block, calibration) -> float:
    """What collapsing only this block really costs: collapse a copy with a one-block plan and measure."""
    clone = copy.deepcopy(model)
    one = hlc.CollapsePlan([plan_block], [plan_block], "", 0.0, 0.0, 0)
    holdout = calibration[len(calibration) // 2:]
    baseline = _Objective(model, holdout)
    reference = baseline()
    hlc.collapse_model(clone, plan=one)
    objective = _Objective(clone, holdout)
    objective.reference = baseline.reference
    return objective() - reference


def test_plan_orders_blocks_by_their_measured_cost_and_respects_num_blocks():
    model, data = tiny_bert(), batches()
    plan = hlc.plan_collapse(model, data, num_blocks=2, show_progress=False)
    costs = sorted(plan.candidates, key=lambda c: c.cost)
    assert [b.name for b in plan.selected] == [c.name for c in costs[:2]]
    for candidate in plan.candidates:
        assert set(candidate.costs) == {"exact", "least_squares", "relative_least_squares"}
        assert candidate.cost == candidate.costs[candidate.method] == min(candidate.costs.values())
        assert candidate.cost == pytest.approx(_single_block_cost(model, candidate, data), rel=1e-4, abs=1e-7)
    assert "encoder.layer" in str(plan) and plan.params_saved == 2 * (2 * 32 * 64 + 64 + 32 - 32 * 32 - 32)


def test_planner_measures_block_groups_one_pass_at_a_time(monkeypatch):
    """Beyond the statistics memory budget the planner gathers, measures and drops one group of blocks at a time:
    the same costs and maps as one pass."""
    import hf_layercollapse.planner.measured as planner

    model, data = tiny_bert(), batches()
    whole = hlc.plan_collapse(model, data, num_blocks=2, show_progress=False)
    monkeypatch.setattr(planner, "statistics_passes", lambda model, requests: [[u] for u in requests])
    split = hlc.plan_collapse(model, data, num_blocks=2, show_progress=False)
    assert [c.costs for c in split.candidates] == pytest.approx([c.costs for c in whole.candidates])
    for a, b in zip(split.candidates, whole.candidates):
        assert a.method == b.method and (a.weight is None or torch.equal(a.weight, b.weight))


def test_params_fraction_and_max_loss_budgets():
    model, data = tiny_bert(), batches()
    total = sum(p.numel() for p in model.parameters())
    per_block = 2 * 32 * 64 + 64 + 32 - 32 * 32 - 32
    plan = hlc.plan_collapse(model, data, params_fraction=1.5 * per_block / total, show_progress=False)
    assert len(plan.selected) == 2  # the smallest number of cheapest blocks that reaches the fraction
    plan = hlc.plan_collapse(model, data, max_loss_increase=1e9, show_progress=False)
    assert len(plan.selected) == 4
    cheapest = min(c.cost for c in plan.candidates)
    tight = hlc.plan_collapse(model, data, max_loss_increase=cheapest * 1.0001, show_progress=False)
    assert 1 <= len(tight.selected) < 4 and tight.measured_cost <= cheapest * 1.0001
    with pytest.raises(ValueError, match=r"removes .* of the parameters at most"):
        hlc.plan_collapse(model, data, params_fraction=0.99, show_progress=False)
    with pytest.raises(ValueError, match="cheapest block alone costs"):
        hlc.plan_collapse(model, data, max_loss_increase=cheapest / 10, show_progress=False)
    with pytest.raises(ValueError, match="between 1 and 4"):
        hlc.plan_collapse(model, data, num_blocks=5, show_progress=False)


def test_applied_plan_equals_the_measured_replacement_and_reloads(tmp_path):
    model, data = tiny_bert(), batches()
    plan = hlc.plan_collapse(model, data, num_blocks=3, show_progress=False)
    ids = data[0]["input_ids"]
    blocks = {b.name: b for b in hlc.find_mlp_blocks(model)}
    from hf_layercollapse.planner.plan import replacement as _replacement

    with torch.no_grad(), replaced_units(model, {blocks[p.name]: _replacement(model, p) for p in plan.selected}):
        expected = model(ids).last_hidden_state
    params_before = sum(p.numel() for p in model.parameters())
    report = hlc.collapse_model(model, plan=plan)
    assert len(report.collapsed) == 3 and report.params_saved == plan.params_saved
    assert params_before - sum(p.numel() for p in model.parameters()) == plan.params_saved
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_plan_save_and_load_round_trip(tmp_path):
    model, data = tiny_bert(), batches()
    plan = hlc.plan_collapse(model, data, num_blocks=2, show_progress=False)
    plan.save(tmp_path)
    loaded = hlc.CollapsePlan.load(tmp_path)
    assert loaded.to_dict() == plan.to_dict()
    saved = json.loads((tmp_path / "collapse_plan.json").read_text())  # a plan from before `costs` existed
    for row in saved["candidates"]:
        costs = row.pop("costs")
        row["cost_exact"], row["cost_least_squares"] = costs["exact"], costs["least_squares"]
    (tmp_path / "collapse_plan.json").write_text(json.dumps(saved))
    old = hlc.CollapsePlan.load(tmp_path)
    assert [b.costs for b in old.candidates] == [{"exact": b.cost_exact, "least_squares": b.cost_least_squares}
                                                  for b in plan.candidates]
    twin = copy.deepcopy(model)
    hlc.collapse_model(model, plan=plan)
    hlc.collapse_model(twin, plan=loaded)
    ids = data[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).last_hidden_state, model(ids).last_hidden_state, atol=0, rtol=0)
    with pytest.raises(ValueError, match="another model"):
        wide = BertModel(BertConfig(vocab_size=60, hidden_size=48, num_hidden_layers=4, num_attention_heads=2,
                                    intermediate_size=64))
        hlc.collapse_model(wide, plan=loaded)


def test_causal_lm_uses_the_language_modelling_loss():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=32, n_layer=3, n_head=2, bos_token_id=0,
                                       eos_token_id=0)).eval()
    plan = hlc.plan_collapse(model, batches(), num_blocks=1, show_progress=False)
    assert plan.objective == "language-modelling loss" and plan.baseline > 3.0  # ≈ ln(60) for random weights


def test_bad_input():
    model = tiny_bert()
    with pytest.raises(ValueError, match="empty"):
        hlc.plan_collapse(model, [], num_blocks=1)
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        hlc.plan_collapse(model, [{"text": ["hello"]}], num_blocks=1)
    mixed = batches()
    mixed[0]["labels"] = mixed[0]["input_ids"]
    with pytest.raises(ValueError, match="1 of the 6 calibration batches have labels"):
        hlc.plan_collapse(model, mixed, num_blocks=1, show_progress=False)
    with pytest.raises(ValueError, match="exactly one budget"):
        hlc.plan_collapse(model, batches(), num_blocks=1, max_loss_increase=0.1)
    with pytest.raises(ValueError, match="leave blocks"):
        hlc.collapse_model(model, plan=hlc.CollapsePlan([], [], "", 0.0, 0.0, 0), threshold=0.1)


def test_real_minilm_least_squares_beats_the_naive_merge_on_held_out_tweets(minilm_and_tweets):
    model, data = minilm_and_tweets
    plan = hlc.plan_collapse(model, data, num_blocks=2, show_progress=False)
    assert plan.objective == "output divergence" and len(plan.candidates) == 6
    for candidate in plan.candidates:  # the MiniLM's GELU blocks are far from linear
        assert candidate.cost_least_squares <= candidate.cost_exact
        assert candidate.method in ("least_squares", "relative_least_squares")
    collapsed = copy.deepcopy(model)
    report = hlc.collapse_model(collapsed, plan=plan)
    assert report.params_saved == 2 * (2 * 384 * 1536 + 1536 + 384 - 384 * 384 - 384)
    holdout = data[3:]
    with torch.no_grad():
        errors = [float((collapsed(**b).last_hidden_state - model(**b).last_hidden_state).square().sum()
                        / model(**b).last_hidden_state.square().sum()) for b in holdout]
    assert sum(errors) / len(errors) == pytest.approx(plan.measured_cost, rel=1e-3)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_planning_and_collapsing_leave_the_global_random_state_alone(name):
    """New projections are built without an initialiser: calling the planner or collapse_model between training
    steps does not change the dropout masks (or any other draw) that follow."""
    from helpers import make_inputs, tiny_model

    model = tiny_model(name)
    batches = [make_inputs(model, seed=s) for s in range(3)]
    state = torch.get_rng_state()
    plan = hlc.plan_collapse(copy.deepcopy(model), batches, num_blocks=1, show_progress=False)
    hlc.collapse_model(copy.deepcopy(model), plan=plan)
    hlc.get_collapse_model(model)
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    hlc.collapse_model(model)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_plan_that_cannot_be_applied_leaves_the_model_unchanged():
    """Every block of the plan is checked before the first one is merged: a block named outside the base model
    (which a checkpoint could not record) fails the plan without merging the blocks before it."""
    from dataclasses import replace

    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert().config).eval()
    data = batches()
    plan = hlc.plan_collapse(model, data, num_blocks=2, show_progress=False)
    last = plan.selected[-1]
    parts = {f: f"{last.name}.{getattr(last.layout, f)}" for f in ("fc1", "act", "fc2")}
    moved = replace(last, name="", layout=replace(last.layout, **parts, dropouts=()))
    plan.selected = [plan.selected[0], moved]
    ids = data[0]["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    params = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="outside the base model"):
        hlc.collapse_model(model, plan=plan)
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def test_a_model_whose_blocks_save_nothing_is_refused():
    torch.manual_seed(0)
    narrow = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=15)).eval()  # 2·32·15 + 15 + 32 < 32·32 + 32: merging grows it
    for budget in ({"num_blocks": 1}, {"max_loss_increase": 1.0}, {"params_fraction": 0.1}):
        with pytest.raises(ValueError, match="saves parameters when merged"):
            hlc.plan_collapse(narrow, batches(), show_progress=False, **budget)


def test_unreadable_plans(tmp_path):
    model, data = tiny_bert(), batches()
    plan = hlc.plan_collapse(model, data, num_blocks=2, show_progress=False)
    plan.save(tmp_path / "plan")
    weights = tmp_path / "plan" / "collapse_plan.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(OSError, match=r"collapse_plan\.safetensors is not the file this checkpoint was saved with"):
        hlc.CollapsePlan.load(tmp_path / "plan")
    (tmp_path / "plan" / MANIFEST_NAME).unlink()  # a plan written without a manifest (hf_layercollapse 0.1)
    with pytest.raises(ValueError, match="does not hold a readable collapse plan"):
        hlc.CollapsePlan.load(tmp_path / "plan")
    weights.write_bytes(good)
    saved = json.loads((tmp_path / "plan" / "collapse_plan.json").read_text())
    (tmp_path / "plan" / "collapse_plan.json").write_text(json.dumps({**saved, "selected": ["encoder.layer.9"]}))
    with pytest.raises(ValueError, match=r"the selected units \['encoder.layer.9'\] are not among the candidates"):
        hlc.CollapsePlan.load(tmp_path / "plan")


def test_plans_of_other_models_and_plans_applied_twice(caplog):
    model, data = tiny_bert(), batches()
    plan = hlc.plan_collapse(model, data, num_blocks=2, show_progress=False)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=32, n_layer=4, n_head=2)).eval()
    with pytest.raises(ValueError, match="the plan belongs to another model"):
        hlc.collapse_model(gpt2, plan=plan)
    hlc.collapse_model(model, plan=plan)
    with pytest.raises(ValueError, match="collapsed already"):
        hlc.collapse_model(model, plan=plan)
    with caplog.at_level("WARNING", logger="hf_layercollapse.planner"):
        hlc.plan_collapse(tiny_bert(), data[:1], num_blocks=1, show_progress=False)
    assert "one calibration batch" in caplog.text


@pytest.mark.parametrize("edit, message", [
    (lambda d, c: d.update(selected="encoder.layer.1"), r"'selected' must be a list of unit names"),
    (lambda d, c: d.update(candidates=3), r"'candidates' must be a list"),
    (lambda d, c: c.pop("layout"), r"unit 'encoder.layer.\d': 'layout' must be an object"),
    (lambda d, c: c.update(method=5), r"unit 'encoder.layer.\d': method=5 is not one of"),
    (lambda d, c: c.update(params_saved="many"), r"unit 'encoder.layer.\d': params_saved='many' must be an integer"),
    (lambda d, c: c["layout"].update(kind="gated"), r"the layout of 'encoder.layer.\d' \(gated\) is malformed"),
    (lambda d, c: d.update(measured_cost="low"), r"'measured_cost' must be a number"),
], ids=["selected", "candidates", "layout", "method", "params_saved", "kind", "measured_cost"])
def test_edited_plans_give_one_error_naming_the_unit(tmp_path, edit, message):
    plan = hlc.plan_collapse(tiny_bert(), batches(), num_blocks=1, show_progress=False)
    plan.save(tmp_path)
    data = json.loads((tmp_path / "collapse_plan.json").read_text())
    edit(data, next(c for c in data["candidates"] if c["name"] in data["selected"]))
    (tmp_path / "collapse_plan.json").write_text(json.dumps(data))
    write_manifest(tmp_path)
    with pytest.raises(LayerCollapseConfigError, match=message):
        hlc.CollapsePlan.load(tmp_path)
