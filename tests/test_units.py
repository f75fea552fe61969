"""Finding MLP blocks: the per-model_type table, the data-flow tracer, gated blocks, and models outside the table."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CONFIGS,
    GATED,
    PLAIN,
    D,
    H,
    expected_blocks,
    hidden_size,
    make_inputs,
    max_abs_diff,
    max_rel_diff,
    num_params,
    outputs,
    saved_per_block,
    set_alphas,
    tiny_model,
)
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

import hf_layercollapse as hlc
from hf_layercollapse.modules import projection_shape
from hf_layercollapse.units import MLP_LAYOUTS

# ------------------------------------------------------------------------------------------ the grid


@pytest.mark.parametrize("name", PLAIN + GATED)
def test_table_and_tracer_agree(name):
    model = tiny_model(name)
    table = hlc.find_mlp_blocks(model, method="table")
    traced = hlc.find_mlp_blocks(model, method="trace")
    assert table == traced  # names, indices, layouts (fc1, act, fc2, dropouts, gate) all equal
    assert len(table) == expected_blocks(name)
    assert hlc.find_mlp_blocks(model) == table  # auto uses the table for known types
    assert [b.index for b in table] == list(range(len(table)))


@pytest.mark.parametrize("name", PLAIN)
def test_plain_blocks_have_the_configured_shapes(name):
    model = tiny_model(name)
    h = hidden_size(name)
    for block in hlc.find_mlp_blocks(model):
        assert block.kind is hlc.BlockKind.PLAIN
        fc1, act, fc2 = (model.get_submodule(block.path(p)) for p in ("fc1", "act", "fc2"))
        assert projection_shape(fc1) == (D, h) and projection_shape(fc2) == (h, D)
        assert not isinstance(act, (nn.Linear, Conv1D)) and not list(act.parameters())
        assert isinstance(fc2, Conv1D) == (name == "gpt2")
        assert (fc1.bias is None) == (name == "t5")


@pytest.mark.parametrize("name", GATED)
def test_gated_blocks_detected(name):
    model = tiny_model(name)
    blocks = hlc.find_mlp_blocks(model)
    assert len(blocks) == expected_blocks(name)
    assert {b.kind for b in blocks} == {hlc.BlockKind.GATED}
    assert all(not b.layout.fused for b in blocks)
    with pytest.raises(ValueError) as info:  # the paper's PReLU cannot linearise a gate
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(activation="prelu"))
    assert "gated" in str(info.value) and "blend" in str(info.value)
    assert not hlc.injected_activations(model)  # refused before touching anything


def test_every_grid_type_is_in_the_table():
    for name in CONFIGS:
        assert name.split("-")[0] in MLP_LAYOUTS


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="method='magic'"):
        hlc.find_mlp_blocks(tiny_model("bert"), method="magic")


# ------------------------------------------------------------------------------------ special layouts


def albert():
    torch.manual_seed(0)
    config = AutoConfig.for_model("albert", vocab_size=99, embedding_size=16, hidden_size=D, num_hidden_layers=3,
                                  num_attention_heads=4, intermediate_size=H, max_position_embeddings=64)
    return AutoModel.from_config(config).eval()


def test_albert_shared_block_found_once_and_collapses_exactly():
    model = albert()
    blocks = hlc.find_mlp_blocks(model)
    assert [b.name for b in blocks] == ["encoder.albert_layer_groups.0.albert_layers.0"]  # used by all 3 layers
    assert blocks == hlc.find_mlp_blocks(model, method="trace")
    inputs = make_inputs(model)
    original, params = outputs(model, inputs), num_params(model)
    hlc.get_collapse_model(model)
    assert max_abs_diff(outputs(model, inputs), original) <= 1e-6
    set_alphas(model, 1.0)
    linear = outputs(model, inputs)
    report = hlc.collapse_model(model)
    assert [b.status for b in report.blocks] == ["collapsed"]
    assert max_rel_diff(outputs(model, inputs), linear) <= 1e-5
    assert params - num_params(model) == saved_per_block(D, H, bias=True)


def test_a_task_head_is_not_taken_for_an_mlp_block():
    """ALBERT's pooler → tanh → dropout → classifier traces like a block; it lies outside the base model, so a
    checkpoint could not record it: the tracer leaves it out and the head model collapses like the base model."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("albert", vocab_size=99, embedding_size=16, hidden_size=D, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=H, max_position_embeddings=64)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    blocks = hlc.find_mlp_blocks(model)
    assert [b.name for b in blocks] == ["albert.encoder.albert_layer_groups.0.albert_layers.0"]
    inputs = make_inputs(model)
    original = outputs(model, inputs)
    hlc.get_collapse_model(model)
    set_alphas(model, 1.0)
    linear = outputs(model, inputs)
    assert max_rel_diff(linear, original) > 1e-3
    assert [b.status for b in hlc.collapse_model(model).blocks] == ["collapsed"]
    assert max_rel_diff(outputs(model, inputs), linear) <= 1e-5


def test_phi3_fused_gate_up_is_gated():
    torch.manual_seed(0)
    config = AutoConfig.for_model("phi3", vocab_size=99, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, intermediate_size=H, max_position_embeddings=64,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = AutoModel.from_config(config).eval()
    blocks = hlc.find_mlp_blocks(model)
    assert blocks == hlc.find_mlp_blocks(model, method="trace")
    assert [b.name for b in blocks] == ["layers.0.mlp", "layers.1.mlp"]
    for block in blocks:
        assert block.kind is hlc.BlockKind.GATED
        assert block.layout.gate == block.layout.up == "gate_up_proj" and block.layout.fused  # both halves in one
        assert projection_shape(model.get_submodule(block.path("up"))) == (D, 2 * H)


# ------------------------------------------------------------------------- models outside the table

OUTSIDE_TABLE = {
    # model_type: (config kwargs, expected block names)
    "mpnet": (dict(vocab_size=99, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=H,
                   max_position_embeddings=64), ["encoder.layer.0", "encoder.layer.1"]),
    "layoutlm": (dict(vocab_size=99, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=H, max_position_embeddings=64), ["encoder.layer.0", "encoder.layer.1"]),
    # XLM's feed-forward blocks all call the same module-level `gelu` object
    "xlm": (dict(vocab_size=99, emb_dim=D, n_layers=2, n_heads=4, max_position_embeddings=64), ["ffns.0", "ffns.1"]),
    # MobileBERT: a bottleneck MLP per layer plus nested extra feed-forward networks
    "mobilebert": (dict(vocab_size=99, hidden_size=D, embedding_size=16, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=H, intra_bottleneck_size=16, true_hidden_size=16,
                        max_position_embeddings=64, num_feedforward_networks=2),
                   ["encoder.layer.0", "encoder.layer.0.ffn.0", "encoder.layer.1", "encoder.layer.1.ffn.0"]),
}


@pytest.mark.parametrize("model_type", list(OUTSIDE_TABLE))
def test_tracer_finds_blocks_outside_the_table_and_collapse_is_exact(model_type):
    kwargs, names = OUTSIDE_TABLE[model_type]
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()
    assert model_type not in MLP_LAYOUTS
    with pytest.raises(ValueError, match="method='trace'"):
        hlc.find_mlp_blocks(model, method="table")
    blocks = hlc.find_mlp_blocks(model)
    assert [b.name for b in blocks] == names
    assert {b.kind for b in blocks} == {hlc.BlockKind.PLAIN}

    inputs = make_inputs(model)
    original, params = outputs(model, inputs), num_params(model)
    hlc.get_collapse_model(model)
    assert list(hlc.injected_activations(model)) == names  # one α per block, even with a shared activation
    assert max_abs_diff(outputs(model, inputs), original) <= 1e-6
    set_alphas(model, 1.0)
    linear = outputs(model, inputs)
    report = hlc.collapse_model(model)
    assert len(report.collapsed) == len(names)
    assert max_rel_diff(outputs(model, inputs), linear) <= 1e-5
    expected = sum(b.params_before - b.params_after for b in report.blocks)
    assert params - num_params(model) == expected


class _MLP(nn.Module):
    def __init__(self, d: int = 8, h: int = 32, act: nn.Module | None = None) -> None:
        super().__init__()
        self.up, self.act, self.drop, self.down = nn.Linear(d, h), act or nn.GELU(), nn.Dropout(0.1), nn.Linear(h, d)

    def forward(self, x):
        return self.down(self.drop(self.act(self.up(x))))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_MLP(), _MLP(act=nn.SiLU())])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_custom_module_traced_with_example_inputs():
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(5, 8)
    with pytest.raises(ValueError, match="example_inputs"):  # no config to build inputs from
        hlc.find_mlp_blocks(model)
    blocks = hlc.find_mlp_blocks(model, {"x": x})
    assert [(b.name, b.layout.fc1, b.layout.act, b.layout.fc2, b.layout.dropouts) for b in blocks] == [
        ("blocks.0", "up", "act", "down", ("drop",)), ("blocks.1", "up", "act", "down", ("drop",))]
    original, params = model(x), num_params(model)
    hlc.get_collapse_model(model, example_inputs={"x": x})
    torch.testing.assert_close(model(x), original, rtol=0, atol=1e-6)
    set_alphas(model, 1.0)
    linear = model(x).detach()
    report = hlc.collapse_model(model)
    assert len(report.collapsed) == 2
    torch.testing.assert_close(model(x), linear, rtol=1e-5, atol=1e-6)
    assert params - num_params(model) == 2 * saved_per_block(8, 32, bias=True)


class _NoMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))  # a functional activation: no module to wrap


def test_model_without_mlp_raises():
    model = _NoMLP()
    assert hlc.find_mlp_blocks(model, {"x": torch.randn(2, 8)}) == []
    with pytest.raises(ValueError, match="No MLP block") as info:
        hlc.get_collapse_model(model, example_inputs={"x": torch.randn(2, 8)})
    assert "_NoMLP" in str(info.value)


def test_transformers_model_without_plain_mlp_raises():
    """SqueezeBERT's feed-forward layers are grouped nn.Conv1d convolutions, not projections."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("squeezebert", vocab_size=99, hidden_size=D, embedding_size=D, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=H, max_position_embeddings=64)
    model = AutoModel.from_config(config).eval()
    with pytest.raises(ValueError, match=r"No MLP block .* SqueezeBertModel"):
        hlc.get_collapse_model(model)


def test_activation_module_shared_across_blocks_refused():
    """One activation module called by two blocks cannot give each block its own α."""
    torch.manual_seed(0)
    model = _Net().eval()
    shared = nn.GELU()
    for block in model.blocks:
        del block.act
    model.act = shared

    def forward(x, self=model):
        for block in self.blocks:
            x = x + block.down(self.act(block.up(x)))
        return self.head(x)

    model.forward = forward
    with pytest.raises(ValueError, match="shared by MLP blocks"):
        hlc.find_mlp_blocks(model, {"x": torch.randn(2, 8)})


def test_tied_projection_weights_refused():
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(2, 8)
    model.blocks[1].up.weight = model.blocks[0].up.weight
    with pytest.raises(ValueError, match=r"shared with \['blocks\.1\.up'\]"):
        hlc.get_collapse_model(model, example_inputs={"x": x})
    assert not hlc.injected_activations(model)
