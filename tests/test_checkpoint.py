"""Checkpoints: collapsed and injected models saved with ``save_pretrained`` load back with plain
``AutoModelForX.from_pretrained`` exactly, refuse to load without the library, work with the rest of
transformers (generate, pipelines, device_map, dtypes, Trainer), and bad checkpoints fail loudly."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import (
    PLAIN,
    D,
    collapse_all,
    expected_blocks,
    hidden_size,
    make_inputs,
    max_abs_diff,
    max_rel_diff,
    num_params,
    outputs,
    saved_per_block,
    set_alphas,
    tiny_config,
    tiny_model,
)
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertTokenizerFast,
    Trainer,
    TrainingArguments,
    pipeline,
)

import hf_layercollapse as hlc
from hf_layercollapse.errors import CheckpointIntegrityError, LayerCollapseConfigError
from hf_layercollapse.record import RECORD_KEY
from hf_layercollapse.saving import MANIFEST_NAME, write_manifest

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".safetensors")


def check_checkpoint_files(directory: Path, model) -> dict:
    """Only safetensors weights; config.json marks the checkpoint as hf_layercollapse with the model's plan."""
    weights = sorted(p.name for p in directory.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    assert weights and all(name.endswith(".safetensors") for name in weights), weights
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == hlc.MODEL_TYPE == "hf_layercollapse"
    assert config["base_model_type"] == model.config.model_type
    plan = config["layercollapse"]
    assert plan["library_version"] == hlc.__version__
    assert plan == json.loads(json.dumps(getattr(model.config, RECORD_KEY)))
    return plan


def reload(model, directory: Path, auto=AutoModel, **kwargs):
    model.save_pretrained(directory)
    loaded = auto.from_pretrained(directory, **kwargs).eval()
    assert type(loaded).__name__ == type(model).__name__  # same class name: pipelines and Trainer match on it
    return loaded


def assert_same_activations(loaded, model) -> None:
    acts, loaded_acts = hlc.injected_activations(model), hlc.injected_activations(loaded)
    assert list(loaded_acts) == list(acts)
    for name, act in acts.items():
        assert loaded_acts[name].mode == act.mode
        assert loaded_acts[name].alpha_value == act.alpha_value
        assert loaded_acts[name].layout == act.layout


# -------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("partial", [False, True], ids=["all", "partial"])
@pytest.mark.parametrize("name", PLAIN)
def test_round_trip_with_automodel(name, partial, tmp_path):
    model = tiny_model(name)
    inputs = make_inputs(model)
    original_params = num_params(model)
    n = expected_blocks(name)
    if partial:  # first block collapsed, last block injected mid-training, any others untouched
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[0, -1]))
        set_alphas(model, 1.0, 0.6)
        hlc.collapse_model(model)
        collapsed = [hlc.find_mlp_blocks(tiny_model(name))[0].name]
    else:
        collapse_all(model)
        collapsed = [b.name for b in hlc.find_mlp_blocks(tiny_model(name))]
    expected = outputs(model, inputs)

    loaded = reload(model, tmp_path)
    plan = check_checkpoint_files(tmp_path, model)
    assert sorted(k for k, v in plan["blocks"].items() if v["state"] == "collapsed") == sorted(collapsed)
    assert all(plan["blocks"][k]["alpha"] == 1.0 for k in collapsed)  # α at collapse
    assert max_abs_diff(outputs(loaded, inputs), expected) <= 1e-6
    assert num_params(loaded) == num_params(model)
    assert_same_activations(loaded, model)
    bias = name != "t5"
    saved = len(collapsed) * saved_per_block(D, hidden_size(name), bias)
    injected = 0 if not partial else 1
    assert num_params(loaded) == original_params - saved + injected
    assert len(collapsed) == (1 if partial else n)


HEADS = [
    (AutoModelForSequenceClassification, "bert"),
    (AutoModelForCausalLM, "gpt2"),
    (AutoModelForCausalLM, "opt"),
    (AutoModelForSeq2SeqLM, "t5"),
    (AutoModelForSeq2SeqLM, "bart"),
    (AutoModelForImageClassification, "vit"),
]


def head_model(auto, name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    return auto.from_config(config).eval()


@pytest.mark.parametrize(("auto", "name"), HEADS, ids=[f"{a.__name__}-{n}" for a, n in HEADS])
def test_round_trip_with_task_auto_classes(auto, name, tmp_path):
    model = head_model(auto, name)
    inputs = make_inputs(model)
    report = collapse_all(model)
    assert len(report.collapsed) == expected_blocks(name)
    expected = outputs(model, inputs)
    loaded = reload(model, tmp_path, auto)
    check_checkpoint_files(tmp_path, model)
    assert max_abs_diff(outputs(loaded, inputs), expected) <= 1e-6
    assert num_params(loaded) == num_params(model)


@pytest.mark.parametrize(("auto", "name", "base"), [
    (AutoModelForSequenceClassification, "bert", "bert"),
    (AutoModelForCausalLM, "gpt2", "transformer"),
    (AutoModelForImageClassification, "vit", "vit"),  # ViTModel renames checkpoint keys on load
])
def test_head_checkpoint_loads_into_automodel(auto, name, base, tmp_path):
    model = head_model(auto, name)
    hlc.get_collapse_model(model)
    set_alphas(model, 1.0, 0.3)
    hlc.collapse_model(model)
    model.save_pretrained(tmp_path)
    plan = json.loads((tmp_path / "config.json").read_text())["layercollapse"]
    assert not any(k.startswith(base + ".") for k in plan["blocks"])  # names relative to the base model
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    body = getattr(model, base)
    assert type(loaded).__name__ == type(body).__name__
    inputs = make_inputs(loaded)
    with torch.no_grad():
        expected = body(**inputs).last_hidden_state
        got = loaded(**inputs).last_hidden_state
    assert float((got - expected).abs().max()) <= 1e-6
    assert list(hlc.injected_activations(loaded)) == list(hlc.injected_activations(body))


def test_checkpoint_without_library_fails_loudly(tmp_path):
    model = tiny_model("bert")
    collapse_all(model)
    model.save_pretrained(tmp_path)
    script = textwrap.dedent("""
        import sys
        import transformers
        assert "hf_layercollapse" not in sys.modules
        model = transformers.AutoModel.from_pretrained(sys.argv[1])
        print("LOADED", type(model).__name__, model)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "LOADED" not in result.stdout
    assert "hf_layercollapse" in result.stderr
    assert "Traceback" in result.stderr


# ----------------------------------------------------------------------------------- with transformers


def test_generate_after_loading(tmp_path):
    model = head_model(AutoModelForCausalLM, "gpt2")
    hlc.get_collapse_model(model)
    set_alphas(model, 0.2, 1.0)  # h.0 stays injected (non-linear), h.1 collapses
    hlc.collapse_model(model)
    loaded = reload(model, tmp_path, AutoModelForCausalLM)
    prompt = torch.tensor([[5, 17, 42, 8]])
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    got = loaded.generate(prompt, max_new_tokens=12, do_sample=False)
    assert got.shape == (1, 16)
    assert torch.equal(got, expected)


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat", "movie", "was",
         "good", "bad", "very", "not", "great", "awful", "film", "it", "is", "."]


def tiny_tokenizer(directory: Path) -> BertTokenizerFast:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"))
    assert tokenizer("the cat sat")["input_ids"] == [2, 5, 7, 9, 3]  # the vocabulary was read
    return tokenizer


def collapsed_classifier(**overrides):
    model = head_model(AutoModelForSequenceClassification, "bert", **overrides)
    hlc.get_collapse_model(model)
    set_alphas(model, 1.0, 0.5)
    hlc.collapse_model(model)
    return model


def test_pipelines_after_loading(tmp_path):
    model = collapsed_classifier()
    tokenizer = tiny_tokenizer(tmp_path / "vocab")
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    texts = ["the movie was very good .", "a bad film"]

    classify = pipeline("text-classification", model=str(tmp_path / "ckpt"), device="cpu")
    assert type(classify.model).__name__ == "BertForSequenceClassification"
    results = classify(texts)
    with torch.no_grad():
        probs = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    for result, row in zip(results, probs):
        assert result["label"] == model.config.id2label[int(row.argmax())]
        assert result["score"] == pytest.approx(float(row.max()), abs=1e-6)

    extract = pipeline("feature-extraction", model=str(tmp_path / "ckpt"), device="cpu")
    features = torch.tensor(extract(texts[0]))
    with torch.no_grad():
        expected = model.bert(**tokenizer([texts[0]], return_tensors="pt")).last_hidden_state
    assert features.shape == expected.shape
    assert float((features - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map(device_map, tmp_path):
    model = head_model(AutoModelForCausalLM, "gpt2")
    collapse_all(model)
    model.save_pretrained(tmp_path)
    inputs = make_inputs(model)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map).eval()
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert max_abs_diff(outputs(loaded, inputs), outputs(model, inputs)) <= 1e-6


def test_dtypes(tmp_path):
    model = head_model(AutoModelForCausalLM, "gpt2")
    hlc.get_collapse_model(model)
    set_alphas(model, 0.25, 1.0)
    hlc.collapse_model(model)
    model.save_pretrained(tmp_path)
    inputs = make_inputs(model)
    expected = outputs(model, inputs)

    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # α included
    # loading in bf16 equals casting the in-memory model, and stays within bf16 precision of fp32
    assert max_abs_diff(outputs(bf16, inputs), outputs(copy.deepcopy(model).to(torch.bfloat16), inputs)) == 0
    assert max_rel_diff(outputs(bf16, inputs), expected) <= 3e-2
    assert hlc.injected_activations(bf16)["transformer.h.0.mlp"].alpha_value == 0.25

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded.half()
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    loaded.float()
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert max_rel_diff(outputs(loaded, inputs), expected) <= 5e-3  # weights went through fp16 once


def test_further_fine_tuning_with_trainer(tmp_path):
    model = collapsed_classifier(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tokenizer = tiny_tokenizer(tmp_path / "vocab")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    texts = ["the movie was very good", "a great film", "it is not good", "an awful film", "the cat sat on a mat",
             "a dog", "bad", "very very good"]
    labels = [1, 1, 0, 0, 1, 0, 0, 1]
    encoded = tokenizer(texts, padding="max_length", max_length=10)
    dataset = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                "labels": labels[i]} for i in range(len(texts))]
    merged = "bert.encoder.layer.0.output.dense.weight"
    before = loaded.state_dict()[merged].clone()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=15, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    trainer = Trainer(model=loaded, args=args, train_dataset=dataset)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0]
    assert not torch.equal(loaded.state_dict()[merged], before)  # the merged projection trains
    assert hlc.injected_activations(loaded)["bert.encoder.layer.1"].alpha_value != 0.5  # and so does α

    trainer.save_model(str(tmp_path / "tuned"))
    tuned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tuned").eval()
    batch = make_inputs(tuned)
    assert max_abs_diff(outputs(tuned, batch), outputs(loaded.eval(), batch)) <= 1e-6


def test_collapse_further_after_loading(tmp_path):
    torch.manual_seed(0)
    model = head_model(AutoModelForCausalLM, "gpt2")
    original_params = num_params(model)
    inputs = make_inputs(model)
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[-1]))
    set_alphas(model, 1.0)
    hlc.collapse_model(model)

    step1 = reload(model, tmp_path / "step1", AutoModelForCausalLM)
    assert [b.name for b in hlc.find_mlp_blocks(step1)] == ["transformer.h.0.mlp"]  # only the remaining block
    hlc.get_collapse_model(step1)
    set_alphas(step1, 1.0)
    linear = outputs(step1, inputs)
    report = hlc.collapse_model(step1)
    assert [b.name for b in report.collapsed] == ["transformer.h.0.mlp"]
    assert max_rel_diff(outputs(step1, inputs), linear) <= 1e-5

    step2 = reload(step1, tmp_path / "step2", AutoModelForCausalLM)
    plan = check_checkpoint_files(tmp_path / "step2", step1)
    assert {k: v["state"] for k, v in plan["blocks"].items()} == {"h.0.mlp": "collapsed", "h.1.mlp": "collapsed"}
    assert max_abs_diff(outputs(step2, inputs), outputs(step1, inputs)) <= 1e-6
    assert num_params(step2) == original_params - 2 * saved_per_block(D, hidden_size("gpt2"), True)


# ----------------------------------------------------------------------------- injected, not collapsed


def test_saved_config_applied_to_a_fresh_base_model(tmp_path):
    config = hlc.LayerCollapseConfig(layers_to_transform=[-1, 0], exclude_modules=["decoder.layers.0"],
                                     activation="prelu", init_alpha=0.2, threshold=0.1)
    first = tiny_model("bart")
    hlc.get_collapse_model(first, config)
    config.save_pretrained(tmp_path)

    second = tiny_model("bart")
    hlc.get_collapse_model(second, hlc.LayerCollapseConfig.from_pretrained(tmp_path))
    assert list(hlc.injected_activations(second)) == ["encoder.layers.0", "decoder.layers.1"]
    assert_same_activations(second, first)
    assert getattr(second.config, RECORD_KEY) == getattr(first.config, RECORD_KEY)
    inputs = make_inputs(first)
    assert max_abs_diff(outputs(second, inputs), outputs(first, inputs)) == 0


# -------------------------------------------------------------------------------------- bad checkpoints


@pytest.fixture
def saved_bert(tmp_path) -> Path:
    model = tiny_model("bert")
    hlc.get_collapse_model(model)
    set_alphas(model, 1.0, 0.4)
    hlc.collapse_model(model)  # layer 0 collapsed, layer 1 injected
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_truncated_weights_name_the_file(saved_bert):
    weights = saved_bert / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as info:
        AutoModel.from_pretrained(saved_bert)
    assert str(weights) in str(info.value)


def test_corrupted_header_names_the_file(saved_bert):
    weights = saved_bert / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:16] = b"\xff" * 16
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception) as info:
        AutoModel.from_pretrained(saved_bert)
    assert str(weights) in str(info.value)


def test_corrupted_shard_is_the_one_named(tmp_path):
    model = tiny_model("bert")
    collapse_all(model)
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "model.safetensors.index.json").is_file()
    bad = shards[-1]
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(OSError) as info:
        AutoModel.from_pretrained(tmp_path)
    assert str(bad) in str(info.value)
    assert not any(str(shard) in str(info.value) for shard in shards[:-1])


def test_plan_naming_a_missing_module(saved_bert):
    def edit(config):
        blocks = config["layercollapse"]["blocks"]
        blocks["encoder.layer.9"] = blocks.pop("encoder.layer.0")

    edit_config(saved_bert, edit)
    with pytest.raises(hlc.LayerCollapseConfigError, match=r"encoder\.layer\.9"):
        AutoModel.from_pretrained(saved_bert)


def test_plan_naming_a_missing_part(saved_bert):
    def edit(config):
        config["layercollapse"]["blocks"]["encoder.layer.0"]["layout"]["fc1"] = "intermediate.wi"

    edit_config(saved_bert, edit)
    with pytest.raises(hlc.LayerCollapseConfigError, match=r"intermediate\.wi"):
        AutoModel.from_pretrained(saved_bert)


@pytest.mark.parametrize("field", ["in_features", "out_features"])
def test_plan_with_wrong_features(saved_bert, field):
    def edit(config):
        config["layercollapse"]["blocks"]["encoder.layer.0"][field] = 48

    edit_config(saved_bert, edit)
    with pytest.raises(hlc.LayerCollapseConfigError, match="48"):
        AutoModel.from_pretrained(saved_bert)


@pytest.mark.parametrize("key", ["encoder.layer.0.output.dense.weight", "encoder.layer.0.output.dense.bias",
                                 "encoder.layer.1.intermediate.intermediate_act_fn.alpha"])
def test_missing_plan_weight_is_an_error(saved_bert, key):
    weights = saved_bert / "model.safetensors"
    tensors = load_file(weights)
    assert key in tensors
    del tensors[key]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointIntegrityError, match=r"model\.safetensors is not the file"):
        AutoModel.from_pretrained(saved_bert)  # the manifest knows the file was rewritten
    (saved_bert / MANIFEST_NAME).unlink()  # a checkpoint without one (hf_layercollapse 0.1, a Hub download)
    with pytest.raises(hlc.LayerCollapseConfigError, match=key.replace(".", r"\.")):
        AutoModel.from_pretrained(saved_bert)


def test_config_without_plan(saved_bert):
    edit_config(saved_bert, lambda config: config.pop("layercollapse"))
    with pytest.raises(hlc.LayerCollapseConfigError, match="'layercollapse' record"):
        AutoConfig.from_pretrained(saved_bert)
    with pytest.raises(hlc.LayerCollapseConfigError, match="'layercollapse' record"):
        AutoModel.from_pretrained(saved_bert)


def test_config_with_unknown_base_type(saved_bert):
    edit_config(saved_bert, lambda config: config.update(base_model_type="not-a-model"))
    with pytest.raises(hlc.LayerCollapseConfigError, match="not-a-model"):
        AutoModel.from_pretrained(saved_bert)


def test_config_with_newer_plan_format(saved_bert):
    edit_config(saved_bert, lambda config: config["layercollapse"].update(format=99))
    with pytest.raises(hlc.LayerCollapseConfigError, match="format 99"):
        AutoModel.from_pretrained(saved_bert)


def test_a_new_head_size_is_not_called_a_corrupt_checkpoint(tmp_path):
    """A different num_labels mismatches the head, not the blocks: transformers' own error (ignore_mismatched_sizes)
    is the right advice, and with it the collapsed blocks load exactly; a wrongly shaped block weight stays ours."""
    model = collapsed_classifier()
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes") as info:
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt", num_labels=5)
    assert not isinstance(info.value, hlc.LayerCollapseConfigError)
    relabelled = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt", num_labels=5,
                                                                    ignore_mismatched_sizes=True).eval()
    assert relabelled.config.num_labels == 5
    inputs = make_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(relabelled.bert(**inputs).last_hidden_state,
                                   model.eval().bert(**inputs).last_hidden_state, atol=0, rtol=0)
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(weights)
    key = "bert.encoder.layer.0.output.dense.weight"  # the collapsed block's merged projection
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    (tmp_path / "ckpt" / MANIFEST_NAME).unlink()  # without the manifest, which would name the rewritten file first
    with pytest.raises(hlc.LayerCollapseConfigError, match="corrupt or belongs to another model"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")


def test_processors_found_through_the_checkpoint_config(tmp_path):
    """AutoTokenizer / AutoImageProcessor read the model's config when the processor's own file names no class
    (bert-base-uncased's tokenizer_config.json does not): a LayerCollapse checkpoint gives the base model's."""
    from transformers import AutoImageProcessor, AutoTokenizer

    model = tiny_model("bert")
    hlc.get_collapse_model(model)
    model.save_pretrained(tmp_path / "bert")
    tiny_tokenizer(tmp_path / "vocab")
    (tmp_path / "bert" / "vocab.txt").write_text((tmp_path / "vocab" / "vocab.txt").read_text())
    (tmp_path / "bert" / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bert")
    assert type(tokenizer).__name__ == "BertTokenizer"
    assert tokenizer("the cat sat")["input_ids"] == [2, 5, 7, 9, 3]
    vit = tiny_model("vit")
    collapse_all(vit)
    vit.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 8, "width": 8}}))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vit")
    assert type(processor).__name__.startswith("ViTImageProcessor")
    assert processor(torch.zeros(3, 16, 16))["pixel_values"][0].shape == (3, 8, 8)


def test_injection_leaves_the_users_config_object_alone(tmp_path):
    config = AutoConfig.for_model("bert", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37)
    config_class = type(config)
    first = AutoModel.from_config(config)
    hlc.get_collapse_model(first, hlc.LayerCollapseConfig())
    assert type(config) is config_class and type(first.config) is not config_class
    assert all(m.config is first.config for m in first.modules() if hasattr(m, "config"))
    AutoModel.from_config(config).save_pretrained(tmp_path)  # a second model of the same config stays stock
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"


def _edit_record(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config[RECORD_KEY]["blocks"])
    (folder / "config.json").write_text(json.dumps(config))
    write_manifest(folder)  # an edit that keeps the manifest consistent: the weights themselves must disagree


def test_a_record_edited_against_its_weights_loads_nothing(tmp_path):
    model = hlc.get_collapse_model(tiny_model("bert"))
    set_alphas(model, 1.0, 1.0)
    hlc.collapse_model(model)
    model.save_pretrained(tmp_path)
    first = next(iter(json.loads((tmp_path / "config.json").read_text())[RECORD_KEY]["blocks"]))
    _edit_record(tmp_path, lambda blocks: blocks[first].update(bias=False))  # the file still holds the bias
    with pytest.raises(LayerCollapseConfigError, match=r"output\.dense\.bias'\] that its collapse record has no place"):
        AutoModel.from_pretrained(tmp_path)
    _edit_record(tmp_path, lambda blocks: (blocks[first].update(bias=True), blocks.pop(first)))
    for options in ({}, {"ignore_mismatched_sizes": True}):  # transformers' advice would load random weights
        with pytest.raises(LayerCollapseConfigError, match=r"encoder\.layer\.0\..*nothing was loaded"):
            AutoModel.from_pretrained(tmp_path, **options)
