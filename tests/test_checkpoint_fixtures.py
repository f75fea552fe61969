"""Checkpoints written by hf_layercollapse 0.1.0 (``tests/fixtures/checkpoints``, one per record format and unit kind)
load with the Auto classes and give the outputs the saved model gave, to 1e-6."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import hf_layercollapse as hlc

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
MODELS = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def expected(folder: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    tensors = load_file(str(folder / "expected.safetensors"))
    inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
    return inputs, tensors["logits"]


def auto_class(folder: Path):
    return getattr(transformers, json.loads((folder / "fixture.json").read_text())["auto"])


def test_every_record_format_has_a_fixture():
    formats = {json.loads((FIXTURES / name / "fixture.json").read_text())["format"] for name in MODELS}
    assert formats == {1, 2, 3}


@pytest.mark.parametrize("name", MODELS)
def test_fixture_checkpoint_loads_with_the_saved_outputs(name):
    folder = FIXTURES / name
    inputs, logits = expected(folder)
    model = auto_class(folder).from_pretrained(folder).eval()
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, logits, rtol=1e-6, atol=1e-6)
    saved = json.loads((folder / "config.json").read_text())["layercollapse"]["blocks"]
    injected = {n for n, e in saved.items() if e["state"] == "injected"}
    assert {n.removeprefix(model.base_model_prefix + ".") for n in hlc.injected_activations(model)} == injected


def test_fixture_plan_applies_to_its_base_model():
    folder = FIXTURES / "bert_plan"
    inputs, logits = expected(folder)
    model = auto_class(folder).from_pretrained(folder / "base").eval()
    plan = hlc.CollapsePlan.load(folder / "plan")
    report = hlc.collapse_model(model, plan=plan)
    assert len(report.collapsed) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=1e-6, atol=1e-6)


def test_fixture_peft_adapter_loads_with_its_alpha_and_gate_constants():
    from peft import PeftModel

    folder = FIXTURES / "llama_peft_adapter"
    inputs, logits = expected(folder)
    base = auto_class(folder).from_pretrained(folder / "base")
    model = PeftModel.from_pretrained(base, folder / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=1e-6, atol=1e-6)
    assert [round(a.alpha_value, 6) for a in hlc.injected_activations(model).values()] == [0.25, 0.75]
