"""Regressions found by the zoo sweep (``scripts/zoo_sweep.py``): tiny float64 models of the failing architectures go
through inject → α = 1 → collapse → save → reload, and every output is compared with the α = 1 model's (1e-8
relative, as the sweep does).

* Funnel (and DeiT's image classifiers): the Auto mappings map their config to a *tuple* of model classes; the derived
  config must map to the tuple of derived classes, resolved by ``config.architectures`` like the base one.
* BLIP: the tracer read the text pooler (``dense → tanh``, whose output the model returns) and the text projection
  as a block at the model's root; such a candidate is no MLP block.
* ShieldGemma 2 (``Gemma3ForConditionalGeneration`` built from a ``ShieldGemma2Config``): transformers' own round trip
  loses the language model's weights (its ``shieldgemma2`` key conversion is meant for
  ``ShieldGemma2ForImageClassification``); the library refuses such a checkpoint instead of loading random weights.
"""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_diff, outputs, set_alphas
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    BlipConfig,
    BlipModel,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    FunnelBaseModel,
    FunnelConfig,
    FunnelModel,
    Gemma3ForConditionalGeneration,
    ShieldGemma2Config,
)

import hf_layercollapse as hlc
from hf_layercollapse.checkpoint import collapsed_config_class, collapsed_model_class, register_auto_classes
from hf_layercollapse.errors import LayerCollapseConfigError
from hf_layercollapse.record import CollapseRecord

TOL = 1e-8


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # buffers computed at construction are built as from_pretrained builds them
    yield
    torch.set_default_dtype(previous)


def build(model_class, config):
    torch.manual_seed(0)
    return model_class(config).double().eval()


def text_inputs(vocab: int = 99, length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def pixels(size: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def inject_and_collapse(model, inputs, example_inputs=None) -> list[torch.Tensor]:
    """Inject every block, set α = 1, collapse; the α = 1 outputs, checked equal to the collapsed model's."""
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(), example_inputs=example_inputs)
    set_alphas(model, 1.0)
    at_one = outputs(model, inputs)
    report = hlc.collapse_model(model)
    assert report.blocks and all(b.status == "collapsed" for b in report.blocks)
    assert max_rel_diff(outputs(model, inputs), at_one) <= TOL
    return at_one


def reload_exactly(model, inputs, at_one, tmp_path, auto):
    model.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(loaded).__name__ == type(model).__name__
    assert CollapseRecord.of(loaded).units.keys() == CollapseRecord.of(model).units.keys()
    assert max_rel_diff(outputs(loaded, inputs), at_one) <= TOL
    return loaded


# ------------------------------------------------------------------------------------------------ tuple mappings
FUNNEL = dict(vocab_size=99, block_sizes=[1, 1, 1], d_model=32, n_head=2, d_head=16, d_inner=38)


def test_tuple_mapping_gets_derived_tuple():
    """The derived config maps to the tuple of derived classes, in the base tuple's order and with its names."""
    config_cls = collapsed_config_class(FunnelConfig)
    register_auto_classes(config_cls)
    value = AutoModel._model_mapping[config_cls]
    assert isinstance(value, tuple)
    assert [c.__name__ for c in value] == ["FunnelModel", "FunnelBaseModel"]
    assert list(value) == [collapsed_model_class(FunnelModel), collapsed_model_class(FunnelBaseModel)]


@pytest.mark.parametrize("model_class", [FunnelModel, FunnelBaseModel])
def test_funnel_reloads_exactly(model_class, tmp_path):
    model = build(model_class, FunnelConfig(**FUNNEL))
    inputs = text_inputs()
    at_one = inject_and_collapse(model, inputs)
    # AutoModel maps funnel to (FunnelModel, FunnelBaseModel): config.architectures picks the saved one
    loaded = reload_exactly(model, inputs, at_one, tmp_path, AutoModel)
    assert isinstance(loaded, model_class)


def test_deit_teacher_classifier_reloads_exactly(tmp_path):
    # AutoModelForImageClassification maps deit to (DeiTForImageClassification, ...WithTeacher)
    config = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=38,
                        image_size=32, patch_size=8, num_labels=3)
    model = build(DeiTForImageClassificationWithTeacher, config)
    inputs = {"pixel_values": pixels()}
    at_one = inject_and_collapse(model, inputs)
    loaded = reload_exactly(model, inputs, at_one, tmp_path, AutoModelForImageClassification)
    assert isinstance(loaded, DeiTForImageClassificationWithTeacher)


# ------------------------------------------------------------------------------------------------ tracer: escapes
class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Pooler(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.activation = nn.Linear(8, 8), nn.Tanh()

    def forward(self, x):
        return self.activation(self.dense(x[:, 0]))


class _PooledModel(nn.Module):
    """BLIP's pattern: an encoder MLP, a pooler ``dense → tanh`` whose output the model returns, and a projection
    of the pooled output in another module (the three meet only at the root)."""

    def __init__(self):
        super().__init__()
        self.mlp, self.pooler, self.projection = _MLP(), _Pooler(), nn.Linear(8, 4)

    def forward(self, x):
        pooled = self.pooler(x + self.mlp(x))
        return {"pooled": pooled, "embeds": self.projection(pooled)}


class _PooledInside(nn.Module):
    """The same inside one submodule, so that the candidate has a non-empty name."""

    def __init__(self):
        super().__init__()
        self.mlp, self.head = _MLP(), nn.Module()
        self.head.dense, self.head.act, self.head.proj = nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)

    def forward(self, x):
        h = x + self.mlp(x)
        pooled = self.head.act(self.head.dense(h[:, 0]))
        return self.head.proj(pooled), pooled


class _IntermediateEscapes(nn.Module):
    """A candidate whose intermediate (the first projection's output) is also added back after the second."""

    def __init__(self):
        super().__init__()
        self.mlp, self.other = _MLP(), nn.Module()
        self.other.fc1, self.other.act, self.other.fc2 = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)

    def forward(self, x):
        h = self.other.fc1(x + self.mlp(x))
        return self.other.fc2(self.other.act(h)) + h


class _HeadIsAnMLP(nn.Module):
    """Control: the same head whose tanh output goes nowhere else is an MLP block, and is found."""

    def __init__(self):
        super().__init__()
        self.mlp, self.head = _MLP(), nn.Module()
        self.head.dense, self.head.act, self.head.proj = nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)

    def forward(self, x):
        h = x + self.mlp(x)
        return self.head.proj(self.head.act(self.head.dense(h[:, 0])))


@pytest.mark.parametrize("model_class,blocks", [
    (_PooledModel, ["mlp"]), (_PooledInside, ["mlp"]), (_IntermediateEscapes, ["mlp"]),
    (_HeadIsAnMLP, ["mlp", "head"]),
])
def test_candidates_whose_tensors_leave_are_no_blocks(model_class, blocks):
    torch.manual_seed(0)
    model = model_class().double().eval()
    example = {"x": torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)}
    assert [b.name for b in hlc.find_mlp_blocks(model, example, method="trace")] == blocks
    inject_and_collapse(model, example, example_inputs=example)  # collapsed == α = 1 outputs, every block merged
    assert hlc.injected_activations(model) == {}


BLIP = dict(
    text_config=dict(vocab_size=99, hidden_size=32, encoder_hidden_size=32, intermediate_size=38, projection_dim=32,
                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64),
    vision_config=dict(hidden_size=32, intermediate_size=38, projection_dim=32, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=8),
    projection_dim=32, image_text_hidden_size=32)


def test_blip_has_no_root_block_and_collapses_exactly(tmp_path):
    model = build(BlipModel, BlipConfig(**BLIP))
    inputs = {**text_inputs(), "pixel_values": pixels()}
    names = [b.name for b in hlc.find_mlp_blocks(model, inputs)]
    assert names == ["text_model.encoder.layer.0", "text_model.encoder.layer.1",
                     "vision_model.encoder.layers.0.mlp", "vision_model.encoder.layers.1.mlp"]
    at_one = inject_and_collapse(model, inputs, example_inputs=inputs)  # the merge check passes: no false block
    reload_exactly(model, inputs, at_one, tmp_path, AutoModel)


# ------------------------------------------------------------------------------------------------ ShieldGemma 2
SHIELDGEMMA2 = dict(
    text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=38, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, layer_types=["sliding_attention", "full_attention"],
                     max_position_embeddings=64),
    vision_config=dict(hidden_size=32, intermediate_size=38, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8))


def _round_trip(model, folder):
    model.save_pretrained(folder)
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float64).eval()


def test_shieldgemma2_config_on_gemma3_reloads_exactly_or_is_refused(tmp_path):
    """transformers applies its ``shieldgemma2`` key conversion (meant for ShieldGemma2ForImageClassification, whose
    ``model`` is a Gemma3ForConditionalGeneration) to any model of that config: a plain save/reload of a
    Gemma3ForConditionalGeneration with a ShieldGemma2Config loses the language model's weights (random init, only
    logged). The library must never do the same silently: its reload is exact where transformers' own is, and a
    LayerCollapseConfigError otherwise."""
    config = ShieldGemma2Config(**SHIELDGEMMA2)
    inputs = text_inputs()
    plain = build(Gemma3ForConditionalGeneration, config)
    plain_exact = max_rel_diff(outputs(_round_trip(plain, tmp_path / "plain"), inputs), outputs(plain, inputs)) <= TOL

    model = build(Gemma3ForConditionalGeneration, config)
    at_one = inject_and_collapse(model, inputs, example_inputs=inputs)
    if plain_exact:
        assert max_rel_diff(outputs(_round_trip(model, tmp_path / "collapsed"), inputs), at_one) <= TOL
    else:
        with pytest.raises(LayerCollapseConfigError, match="lacks or has wrongly shaped weights"):
            _round_trip(model, tmp_path / "collapsed")
