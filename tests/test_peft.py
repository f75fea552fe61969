"""PEFT integration: LayerCollapse as a PEFT method (registration, config files, get_peft_model, save/load,
AutoPeftModel, merge_and_unload), the LoRA + LayerCollapse recipe, the trainer on PEFT models, and bad input.

Every test compares numbers: outputs, weights, parameter counts, α values.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import (
    D,
    H,
    logits,
    make_inputs,
    max_abs_diff,
    max_rel_diff,
    no_peft_left,
    num_params,
    outputs,
    random_lora,
    saved_per_block,
    set_alphas,
    tiny_model,
    trainable_kinds,
)
from peft import (
    AutoPeftModelForSequenceClassification,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftType,
    get_peft_model,
)
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    TrainingArguments,
)

import hf_layercollapse as hlc
from hf_layercollapse.config import CONFIG_NAME

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

GRID = ["bert", "gpt2", "t5"]
#: LoRA targets per architecture: attention and both projections of every MLP block.
LORA_TARGETS = {
    "bert": ["query", "value", "intermediate.dense", "output.dense"],
    "gpt2": ["c_attn", "c_fc", "mlp.c_proj"],
    "t5": ["q", "v", "wi", "wo"],
}
BIAS = {"bert": True, "gpt2": True, "t5": False}


def bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=H, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def classification_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(1, 50, (4, 7), generator=generator)}


# ------------------------------------------------------------------------------------------- registration


def test_registered_on_import_without_changing_peft():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["LAYERCOLLAPSE"] is hlc.LayerCollapseConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["LAYERCOLLAPSE"] is hlc.LayerCollapseModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["LAYERCOLLAPSE"] == "layercollapse_"
    assert "LAYERCOLLAPSE" not in PeftType.__members__  # PEFT's closed enum is untouched
    config = PeftConfig.from_peft_type(peft_type="LAYERCOLLAPSE", threshold=0.1)
    assert isinstance(config, hlc.LayerCollapseConfig) and config.threshold == 0.1


def test_config_is_a_peft_config_and_keeps_its_own_file(tmp_path):
    config = hlc.LayerCollapseConfig(layers_to_transform=[-1], reg_weight=0.5, threshold=0.1)
    assert isinstance(config, PeftConfig) and config.peft_type == "LAYERCOLLAPSE"
    assert config.save_pretrained(tmp_path / "own") == tmp_path / "own" / CONFIG_NAME
    assert [p.name for p in (tmp_path / "own").iterdir()] == [CONFIG_NAME]
    path = config.save_pretrained(tmp_path / "adapter", adapter_format=True)  # what PeftModel.save_pretrained writes
    assert path.name == "adapter_config.json" and json.loads(path.read_text())["peft_type"] == "LAYERCOLLAPSE"
    for folder in ("own", "adapter"):
        assert hlc.LayerCollapseConfig.from_pretrained(tmp_path / folder) == config
    assert PeftConfig.from_pretrained(str(tmp_path / "adapter")) == config
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        hlc.LayerCollapseConfig.from_pretrained(tmp_path)


def test_lora_config_is_normalised_and_round_trips(tmp_path):
    lora = LoraConfig(r=4, target_modules={"value", "query"}, modules_to_save=["pooler"], task_type="SEQ_CLS")
    config = hlc.LayerCollapseConfig(lora_config=lora, modules_to_save=["classifier"])
    assert config.lora_config["target_modules"] == ["query", "value"] and config.lora_config["r"] == 4
    assert "modules_to_save" not in config.lora_config and "peft_type" not in config.lora_config
    assert config.modules_to_save == ["classifier", "pooler"] and config.task_type == "SEQ_CLS"
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert hlc.LayerCollapseConfig.from_dict(config.to_dict()) == config
    rebuilt = config.get_lora_config()
    assert isinstance(rebuilt, LoraConfig) and (rebuilt.r, rebuilt.target_modules) == (4, {"query", "value"})
    config.save_pretrained(tmp_path)
    assert hlc.LayerCollapseConfig.from_pretrained(tmp_path) == config


@pytest.mark.parametrize(("value", "needle"), [(3, "lora_config=3"), (IA3Config(target_modules=["q"]).to_dict(),
                                                                       "peft_type='IA3'"),
                                               ({"r": 4, "use_dora": True, "lora_bias": True}, "not a valid")])
def test_bad_lora_config_rejected(value, needle):
    with pytest.raises(ValueError, match=needle):
        hlc.LayerCollapseConfig(lora_config=value)


# ------------------------------------------------------------------------- LayerCollapse as a PEFT method


def test_unload_gives_the_original_model_back():
    model = tiny_model("bert")
    inputs = make_inputs(model)
    before = outputs(model, inputs)
    peft_model = get_peft_model(model, hlc.LayerCollapseConfig())
    set_alphas(peft_model, 0.7)
    assert max_abs_diff(outputs(peft_model, inputs), before) > 1e-3
    original = peft_model.unload()
    assert no_peft_left(original) and not hlc.injected_activations(original)
    assert max_abs_diff(outputs(original, inputs), before) == 0.0


def test_peft_save_and_load_keep_alpha_and_head(tmp_path):
    model = bert_classifier()
    batch = classification_batch()
    peft_model = get_peft_model(model, hlc.LayerCollapseConfig(layers_to_transform=[-1], task_type="SEQ_CLS"))
    head = {"lora": 0, "alpha": 1, "gate_constant": 0, "saved_module": 2 * D + 2, "base": 0}
    assert trainable_kinds(peft_model) == head
    set_alphas(peft_model, 0.37)
    with torch.no_grad():  # a "trained" head: PEFT saves it through modules_to_save
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    alpha_keys = [k for k in saved if k.endswith("layercollapse_alpha")]
    assert alpha_keys == ["base_model.model.bert.encoder.layer.1.intermediate.intermediate_act_fn.layercollapse_alpha"]
    assert float(saved[alpha_keys[0]]) == pytest.approx(0.37)
    assert not any("encoder.layer.0.intermediate.dense" in k for k in saved)  # the frozen base is not saved

    loaded = PeftModel.from_pretrained(bert_classifier(), tmp_path)
    assert isinstance(loaded.base_model, hlc.LayerCollapseModel)
    assert max_abs_diff([logits(loaded, batch)], [expected]) == 0.0
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default, as for any adapter
    trainable = PeftModel.from_pretrained(bert_classifier(), tmp_path, is_trainable=True)
    assert trainable_kinds(trainable) == head
    on_meta_first = PeftModel.from_pretrained(bert_classifier(), tmp_path, low_cpu_mem_usage=True)
    assert max_abs_diff([logits(on_meta_first, batch)], [expected]) == 0.0


def test_auto_peft_model_and_merged_checkpoint(tmp_path):
    bert_classifier().save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    batch = classification_batch()
    peft_model = get_peft_model(base, hlc.LayerCollapseConfig(task_type="SEQ_CLS"))
    set_alphas(peft_model, 1.0, 0.5)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base")

    auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert max_abs_diff([logits(auto, batch)], [expected]) == 0.0
    merged = auto.merge_and_unload()
    assert [b.name for b in auto.base_model.collapse_report.collapsed] == ["bert.encoder.layer.0"]
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert max_rel_diff([logits(reloaded, batch)], [expected]) < 1e-5
    assert num_params(reloaded) == num_params(bert_classifier()) - saved_per_block(D, H, bias=True) + 1  # kept α


# ---------------------------------------------------------------------------------- LoRA + LayerCollapse


@pytest.mark.parametrize("name", GRID)
def test_lora_merged_then_collapsed_equals_lora_alpha_model_at_one(name, tmp_path):
    model = tiny_model(name)
    inputs = make_inputs(model)
    before = outputs(model, inputs)
    base_params = num_params(model)
    peft_model = hlc.get_lora_collapse_model(model, random_lora(LORA_TARGETS[name]))
    kinds = trainable_kinds(peft_model)
    blocks = len(hlc.injected_activations(peft_model))
    assert kinds["lora"] > 0 and kinds["alpha"] == blocks and kinds["base"] == 0 and kinds["saved_module"] == 0
    lora_layers = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert any(n.endswith(("intermediate.dense", "c_fc", "wi")) for n in lora_layers)  # LoRA on collapsed fc1s too
    assert max_abs_diff(outputs(peft_model, inputs), before) > 1e-3  # LoRA is active
    set_alphas(peft_model, 1.0)
    expected = outputs(peft_model, inputs)

    if name == "bert":  # the merged projection is (W2 + s·B2A2)(W1 + s·B1A1) with the LoRA factors
        block = peft_model.base_model.model.encoder.layer[0]
        fc1, fc2 = block.intermediate.dense, block.output.dense
        w1 = fc1.base_layer.weight + 2.0 * fc1.lora_B["default"].weight @ fc1.lora_A["default"].weight
        w2 = fc2.base_layer.weight + 2.0 * fc2.lora_B["default"].weight @ fc2.lora_A["default"].weight
        want_weight, want_bias = (w2 @ w1).detach(), (w2 @ fc1.base_layer.bias + fc2.base_layer.bias).detach()

    merged, report = hlc.merge_lora_and_collapse(peft_model, return_report=True)
    assert len(report.collapsed) == blocks and no_peft_left(merged)
    assert num_params(merged) == base_params - blocks * saved_per_block(D, H, BIAS[name])
    assert max_rel_diff(outputs(merged, inputs), expected) < 1e-5
    if name == "bert":
        torch.testing.assert_close(merged.encoder.layer[0].output.dense.weight, want_weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged.encoder.layer[0].output.dense.bias, want_bias, rtol=1e-5, atol=1e-6)

    merged.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert max_abs_diff(outputs(loaded, inputs), outputs(merged, inputs)) < 1e-6


def test_lora_recipe_trained_saved_loaded_gives_the_same_outputs(tmp_path):
    """Fine-tune LoRA + α + head a few steps, save with PEFT, load on a fresh base: every trained number is back."""
    model = bert_classifier()
    batch = classification_batch()
    labels = torch.tensor([0, 1, 1, 0])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = hlc.get_lora_collapse_model(
        model, LoraConfig(r=4, target_modules=["query", "value", "intermediate.dense", "output.dense"],
                          task_type="SEQ_CLS"), hlc.LayerCollapseConfig(layers_to_transform=[-1]))
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trained.items()}
    optimizer = torch.optim.Adam(trained.values(), lr=0.05)
    peft_model.train()
    for _ in range(3):
        loss = peft_model(**batch, labels=labels).loss + hlc.regularization_loss(peft_model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    moved = {n for n, p in trained.items() if not torch.equal(p, start[n])}
    assert moved == set(trained)  # LoRA A and B, α and the head all trained
    base_now = peft_model.get_base_model().state_dict()
    wrapped_as = [("dense.", "dense.base_layer."), ("query.", "query.base_layer."), ("value.", "value.base_layer."),
                  ("classifier.", "classifier.original_module.")]
    for key, value in base_state.items():  # the frozen base weights did not move
        peft_key = next(k for k in [key] + [key.replace(a, b) for a, b in wrapped_as] if k in base_now)
        assert torch.equal(base_now[peft_key], value), key
    alpha = hlc.injected_activations(peft_model)["base_model.model.bert.encoder.layer.1"].alpha_value
    assert 0.0 < alpha < 1.0
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(bert_classifier(), tmp_path, is_trainable=True)
    assert max_abs_diff([logits(loaded, batch)], [expected]) == 0.0
    reloaded = dict(loaded.named_parameters())
    for name, value in trained.items():
        assert torch.equal(reloaded[name], value), name
    assert trainable_kinds(loaded) == trainable_kinds(peft_model)

    # merging keeps everything too: the block is far from α = 1, so it stays injected with its trained α
    merged = hlc.merge_lora_and_collapse(loaded)
    assert hlc.injected_activations(merged)["bert.encoder.layer.1"].alpha_value == pytest.approx(alpha)
    assert max_rel_diff([logits(merged, batch)], [expected]) < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert max_abs_diff([logits(final, batch)], [logits(merged, batch)]) == 0.0


# ------------------------------------------------------------------------------------------- bad input


def test_collapse_refuses_unmerged_adapters_and_merging_first_works():
    model = tiny_model("bert")
    inputs = make_inputs(model)
    peft_model = hlc.get_lora_collapse_model(model, random_lora(["intermediate.dense", "output.dense"]))
    set_alphas(peft_model, 1.0)
    expected = outputs(peft_model, inputs)
    with pytest.raises(ValueError, match=r"not merged.*merge_lora_and_collapse"):
        hlc.collapse_model(peft_model)
    assert max_abs_diff(outputs(peft_model, inputs), expected) == 0.0  # nothing was changed

    # LoRA-only PeftModel over a get_collapse_model model, LoRA on fc1/fc2 of the blocks being collapsed
    plain = tiny_model("bert")
    hlc.get_collapse_model(plain)
    set_alphas(plain, 1.0)
    lora_only = get_peft_model(plain, random_lora(["intermediate.dense", "output.dense"]))
    expected = outputs(lora_only, inputs)
    with pytest.raises(ValueError, match=r"\['intermediate.dense', 'output.dense'\] are wrapped by PEFT"):
        hlc.collapse_model(lora_only)
    merged = hlc.merge_lora_and_collapse(lora_only)  # LoRA merged first, then the blocks
    assert len(merged.config.layercollapse["blocks"]) == 2 and no_peft_left(merged)
    assert max_rel_diff(outputs(merged, inputs), expected) < 1e-5


def test_trainer_refuses_lora_only_peft_model_with_frozen_alpha(tmp_path):
    model = bert_classifier()
    hlc.get_collapse_model(model)
    lora_only = get_peft_model(model, LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    assert not any(a.alpha.requires_grad for a in hlc.injected_activations(lora_only).values())
    args = TrainingArguments(tmp_path, max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"froze their α.*get_lora_collapse_model"):
        hlc.LayerCollapseTrainer(model=lora_only, args=args, train_dataset=[])


def test_peft_on_a_model_prepared_by_get_collapse_model_or_without_blocks_is_refused():
    model = tiny_model("bert")
    hlc.get_collapse_model(model)
    with pytest.raises(ValueError, match=r"either get_collapse_model.*or the PEFT adapter"):
        get_peft_model(model, hlc.LayerCollapseConfig())
    with pytest.raises(ValueError, match="does not add LoRA layers"):
        hlc.get_collapse_model(tiny_model("bert"), hlc.LayerCollapseConfig(lora_config={"target_modules": ["query"]}))


# ------------------------------------------------------------------------------------------------ trainer


def test_trainer_trains_alpha_and_lora_inside_peft_model_and_collapses_at_end(tmp_path):
    model = bert_classifier()
    base_query = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    peft_model = hlc.get_lora_collapse_model(
        model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
        hlc.LayerCollapseConfig(layers_to_transform=[-1], reg_weight=5.0, threshold=0.05))
    lora_b = peft_model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 50, (6,), generator=generator), "labels": torch.tensor(i % 2)}
            for i in range(16)]
    args = TrainingArguments(tmp_path / "out", max_steps=4, per_device_train_batch_size=4, learning_rate=0.01,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=1)
    trainer = hlc.LayerCollapseTrainer(model=peft_model, args=args, train_dataset=data,
                                       collapse_args=hlc.CollapseArguments(alpha_learning_rate=0.5,
                                                                           collapse_at_end=True))
    assert (trainer.collapse_args.reg_weight, trainer.collapse_args.threshold) == (5.0, 0.05)  # from the adapter
    act = hlc.injected_activations(peft_model)["base_model.model.bert.encoder.layer.1"]
    grads = []
    act.alpha.register_hook(lambda grad: grads.append(float(grad[0])))
    trainer.train()
    # the pull towards 1, −2λ(1−α) = −10 at α = 0 with λ = 5 from the adapter's config, reaches α inside the PeftModel
    assert len(grads) == 4 and grads[0] == pytest.approx(-10.0, abs=0.1) and grads[1] < -4
    assert act.alpha_value == 1.0  # moved 0 → 1 (clamped) with α's own learning rate
    assert float(lora_b.abs().sum()) > 0  # LoRA B started at zero and trained
    assert any("alpha/base_model.model.bert.encoder.layer.1" in log for log in trainer.state.log_history)

    merged = trainer.model  # collapse_at_end merged LoRA, collapsed the block and saved the plain model
    assert no_peft_left(merged) and [b.name for b in trainer.collapse_report.collapsed] == ["bert.encoder.layer.1"]
    assert not torch.equal(merged.bert.encoder.layer[0].attention.self.query.weight, base_query)  # LoRA merged
    batch = classification_batch()
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert max_abs_diff([logits(saved, batch)], [logits(merged.eval(), batch)]) == 0.0
    assert num_params(saved) == num_params(bert_classifier()) - saved_per_block(D, H, bias=True)


# ---------------------------------------------------------------------------------------------- MiniLM


def test_minilm_lora_collapse_recipe(minilm_path, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = tokenizer(["what a great day", "this is the worst service ever", "ok"], padding=True,
                      return_tensors="pt")
    params_before = num_params(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = hlc.get_lora_collapse_model(
            base, random_lora(["query", "value", "intermediate.dense", "output.dense"], task_type="SEQ_CLS"),
            hlc.LayerCollapseConfig(layers_to_transform=[-2, -1]))
    kinds = trainable_kinds(peft_model)
    assert kinds["alpha"] == 2 and kinds["base"] == 0
    assert 0 < kinds["lora"] + kinds["saved_module"] < 0.05 * params_before
    set_alphas(peft_model, 1.0)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert max_abs_diff([logits(auto, batch)], [expected]) == 0.0

    merged = auto.merge_and_unload()
    hidden, intermediate = base.config.hidden_size, base.config.intermediate_size
    assert num_params(merged) == params_before - 2 * saved_per_block(hidden, intermediate, bias=True)
    assert max_rel_diff([logits(merged, batch)], [expected]) < 1e-4
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert max_abs_diff([logits(reloaded, batch)], [logits(merged, batch)]) == 0.0


@pytest.mark.slow
def test_example_smoke_run(tmp_path, minilm_path):
    """examples/run_lora_collapse.py end to end on a few tweets: what it reports is consistent."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "run_lora_collapse.py"
    spec = importlib.util.spec_from_file_location("run_lora_collapse", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--output_dir", str(tmp_path), "--max_steps", "4", "--batch_size", "8", "--train_size",
                            "32", "--eval_size", "64", "--alpha_learning_rate", "1.0", "--reg_warmup_ratio", "0"])
    params = results["params"]
    assert params["trainable_alpha"] == 3 and params["trainable_other"] == 0 and params["trainable_head"] == 2 * 384 + 2
    assert params["trainable"] == params["trainable_lora"] + params["trainable_alpha"] + params["trainable_head"]
    assert results["collapse"]["collapsed_blocks"] == 3  # α 0 → 1 (clamped) with α lr 1
    assert results["collapse"]["params_saved"] == 3 * saved_per_block(384, 1536, bias=True)
    assert results["accuracy_collapsed"] == results["accuracy_reloaded"]
    assert json.loads((tmp_path / "lora_collapse_results.json").read_text())["alphas"] == results["alphas"]


def test_registration_refuses_to_overwrite_another_packages_method():
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    ours = PEFT_TYPE_TO_TUNER_MAPPING["LAYERCOLLAPSE"]

    class Foreign:  # another package's tuner under the same name
        pass

    PEFT_TYPE_TO_TUNER_MAPPING["LAYERCOLLAPSE"] = Foreign
    try:
        with pytest.raises(RuntimeError, match="another installed package uses that name"):
            hlc.register_peft_method()
        assert PEFT_TYPE_TO_TUNER_MAPPING["LAYERCOLLAPSE"] is Foreign  # left as it was
    finally:
        PEFT_TYPE_TO_TUNER_MAPPING["LAYERCOLLAPSE"] = ours
    hlc.register_peft_method()  # ours again: registering twice is harmless
    assert PEFT_TYPE_TO_TUNER_MAPPING["LAYERCOLLAPSE"] is ours
