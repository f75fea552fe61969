"""LayerCollapseConfig: validation, serialisation, and how its selectors pick MLP blocks at injection."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

import hf_layercollapse as hlc
from hf_layercollapse.config import CONFIG_NAME


def bert(layers: int = 12) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertModel(config).eval()


def injected(model, **kwargs) -> list[str]:
    """Names of the blocks that ``get_collapse_model`` wraps with the config built from ``kwargs``."""
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(**kwargs))
    return list(hlc.injected_activations(model))


def layer(*indices: int) -> list[str]:
    return [f"encoder.layer.{i}" for i in indices]


# ------------------------------------------------------------------------------------------- validation


def test_defaults():
    config = hlc.LayerCollapseConfig()
    assert (config.activation, config.init_alpha, config.reg_weight, config.threshold) == ("blend", 0.0, 1.0, 0.05)
    assert config.target_modules is None and config.exclude_modules is None and config.layers_to_transform is None
    assert hlc.LayerCollapseConfig(activation="prelu").init_alpha == 0.01  # the paper's PReLU start
    assert hlc.LayerCollapseConfig(activation="prelu", init_alpha=0.0).init_alpha == 0.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(activation="gelu"), "activation='gelu'"),
        (dict(activation="PReLU"), "activation='PReLU'"),
        (dict(reg_weight=-0.1), "reg_weight=-0.1"),
        (dict(reg_weight=float("nan")), "reg_weight=nan"),
        (dict(threshold=-0.01), "threshold=-0.01"),
        (dict(threshold=1.5), "threshold=1.5"),
        (dict(init_alpha=-0.5), "init_alpha=-0.5"),
        (dict(init_alpha=1.01), "init_alpha=1.01"),
        (dict(activation="prelu", init_alpha=2.0), "init_alpha=2.0"),
        (dict(target_modules="layer.(1"), "target_modules='layer.(1'"),
        (dict(exclude_modules="[unclosed"), "exclude_modules='[unclosed'"),
        (dict(target_modules=["ok", ""]), "target_modules="),
        (dict(target_modules=[3]), "target_modules=[3]"),
        (dict(exclude_modules=7), "exclude_modules=7"),
        (dict(layers_to_transform="last"), "layers_to_transform='last'"),
        (dict(layers_to_transform=[1, 2.5]), "layers_to_transform=[1, 2.5]"),
    ],
)
def test_invalid_values_raise_naming_field_and_value(kwargs, needle):
    with pytest.raises(ValueError) as info:
        hlc.LayerCollapseConfig(**kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_boundary_values_accepted(value):
    config = hlc.LayerCollapseConfig(threshold=value, init_alpha=value, reg_weight=value)
    assert (config.threshold, config.init_alpha, config.reg_weight) == (value, value, value)


def test_tuple_and_range_selectors_become_lists():
    config = hlc.LayerCollapseConfig(target_modules=("b", "a"), layers_to_transform=range(2))
    assert config.target_modules == ["b", "a"] and config.layers_to_transform == [0, 1]
    assert json.loads(json.dumps(config.to_dict()))["layers_to_transform"] == [0, 1]


# ---------------------------------------------------------------------------------------- serialisation


def test_save_and_load_round_trip(tmp_path):
    config = hlc.LayerCollapseConfig(target_modules=r".*layer\.(10|11)", exclude_modules=["layer.10"],
                                     layers_to_transform=[-2, -1], activation="prelu", init_alpha=0.2,
                                     reg_weight=0.5, threshold=0.1)
    path = config.save_pretrained(tmp_path / "out")
    assert path == tmp_path / "out" / CONFIG_NAME
    assert [p.name for p in (tmp_path / "out").iterdir()] == [CONFIG_NAME]  # atomic write: no temp file left
    assert json.loads(path.read_text()) == config.to_dict()
    assert hlc.LayerCollapseConfig.from_pretrained(tmp_path / "out") == config  # from the directory
    assert hlc.LayerCollapseConfig.from_pretrained(path) == config  # from the file
    assert hlc.LayerCollapseConfig.from_dict(config.to_dict()) == config


def test_unknown_keys_rejected(tmp_path):
    data = hlc.LayerCollapseConfig().to_dict() | {"lora_alpha": 8}
    with pytest.raises(ValueError, match="lora_alpha"):
        hlc.LayerCollapseConfig.from_dict(data)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lora_alpha"):
        hlc.LayerCollapseConfig.from_pretrained(tmp_path)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        hlc.LayerCollapseConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path / CONFIG_NAME)):
        hlc.LayerCollapseConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"threshold": 3}))
    with pytest.raises(ValueError, match="threshold=3"):
        hlc.LayerCollapseConfig.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------ selection at injection


def test_default_selects_every_block():
    assert injected(bert(3)) == layer(0, 1, 2)


def test_target_modules_list_is_name_or_dotted_suffix():
    model = bert(12)
    assert injected(model, target_modules=["layer.1"]) == layer(1)  # not layer.10 / layer.11: dotted suffix
    assert injected(bert(12), target_modules=["encoder.layer.11", "layer.3"]) == layer(3, 11)
    # a module of the block (its input projection, activation or output projection) selects the block
    assert injected(bert(2), target_modules=["intermediate.dense"]) == layer(0, 1)
    assert injected(bert(2), target_modules=["encoder.layer.1.output.dense"]) == layer(1)
    assert injected(bert(2), target_modules=["intermediate_act_fn"]) == layer(0, 1)
    for partial_name in (["ayer.1"], ["ense"], ["r.1.output.dense"]):  # a suffix must start at a dot
        with pytest.raises(ValueError, match="target_modules"):
            injected(bert(12), target_modules=partial_name)
    assert injected(bert(3), exclude_modules=["ayer.1"]) == layer(0, 1, 2)


def test_target_modules_string_is_a_full_match_regex():
    assert injected(bert(12), target_modules=r"encoder\.layer\.1") == layer(1)
    assert injected(bert(12), target_modules=r".*layer\.1\d") == layer(10, 11)
    assert injected(bert(12), target_modules=r".*\.(2|7)\.output\.dense") == layer(2, 7)
    with pytest.raises(ValueError, match="target_modules"):
        injected(bert(12), target_modules=r"layer\.1")  # a partial match is no match


def test_target_modules_matching_nothing_raises_at_injection():
    model = bert(2)
    with pytest.raises(ValueError, match=r"target_modules=\['layer\.5'\]"):
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(target_modules=["layer.5"]))
    with pytest.raises(ValueError, match="target_modules='nothing'"):
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(target_modules="nothing"))
    with pytest.raises(ValueError, match="target_modules"):
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(target_modules=["dense.weight"]))
    assert not hlc.injected_activations(model)  # nothing half-injected


def test_exclude_modules():
    assert injected(bert(4), exclude_modules=["layer.0", "encoder.layer.2"]) == layer(1, 3)
    assert injected(bert(4), exclude_modules=r"encoder\.layer\.[01]") == layer(2, 3)
    assert injected(bert(12), target_modules=r".*layer\.1\d?", exclude_modules=["layer.10"]) == layer(1, 11)
    with pytest.raises(ValueError, match="selects no MLP block"):
        injected(bert(2), exclude_modules=["intermediate.dense"])


def test_layers_to_transform():
    assert injected(bert(4), layers_to_transform=[-1]) == layer(3)  # the last block
    assert injected(bert(4), layers_to_transform=-2) == layer(2)
    assert injected(bert(6), layers_to_transform=[-3, -2, -1]) == layer(3, 4, 5)  # the paper's "last k"
    assert injected(bert(4), layers_to_transform=[0, -1]) == layer(0, 3)
    assert injected(bert(4), layers_to_transform=[1, -3]) == layer(1)  # the same block twice
    assert injected(bert(12), layers_to_transform=[-2, -1], exclude_modules=["layer.11"]) == layer(10)


@pytest.mark.parametrize("indices", [[4], [-5], 7, [0, 9]])
def test_layers_to_transform_out_of_range(indices):
    model = bert(4)
    with pytest.raises(ValueError, match="layers_to_transform") as info:
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=indices))
    assert "4 MLP blocks" in str(info.value)
    assert not hlc.injected_activations(model)


def test_layers_count_mlp_blocks_not_modules():
    """Indices count MLP blocks in model order (the research code counted all modules)."""
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32)).eval()
    assert injected(model, layers_to_transform=[0, -1]) == ["h.0.mlp", "h.2.mlp"]


def test_config_values_reach_the_activations():
    model = bert(3)
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(activation="prelu", init_alpha=0.25, layers_to_transform=1))
    (act,) = hlc.injected_activations(model).values()
    assert act.mode == "prelu" and act.alpha_value == 0.25 and act.alpha.shape == (1,)
