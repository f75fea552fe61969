"""``hf-layercollapse`` inspect / collapse / card on tiny models, through ``main([...])`` and its exit codes.

``push`` runs against the test Hub in ``tests/test_hub.py``.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, BertTokenizer

if str(Path(__file__).parent) not in sys.path:  # robust to --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny_config, tiny_model

import hf_layercollapse as hlc
from hf_layercollapse.card import build_collapse_report
from hf_layercollapse.cli import COMMANDS, main
from hf_layercollapse.collapse import model_params
from hf_layercollapse.record import RECORD_KEY

IDS = torch.tensor([[1, 5, 7, 2, 9]])


@pytest.fixture(scope="module")
def injected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A saved injected GPT-2 LM (block 1 at α = 1, block 0 at α = 0.3) with a tokenizer, and its in-memory twin."""
    torch.manual_seed(0)
    model = hlc.get_collapse_model(AutoModelForCausalLM.from_config(tiny_config("gpt2")).eval())
    alphas = hlc.injected_activations(model)
    alphas["transformer.h.0.mlp"].alpha.data.fill_(0.3)
    alphas["transformer.h.1.mlp"].alpha.data.fill_(1.0)
    directory = tmp_path_factory.mktemp("injected")
    model.save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello"]))
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def collapsed(injected: tuple[Path, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("collapsed") / "out"
    assert main(["collapse", str(injected[0]), str(out)]) == 0
    return out


def _errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hf-layercollapse: error:")]
    return code, lines[0] if lines else err


def test_help_and_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("inspect", "collapse", "card", "push"))
    for name in COMMANDS:
        assert main([name, "--help"]) == 0
    assert "--threshold" in capsys.readouterr().out
    scripts = entry_points(group="console_scripts")
    assert any(e.name == "hf-layercollapse" and e.value == "hf_layercollapse.cli:main" for e in scripts)


def test_inspect_injected(injected: tuple[Path, torch.nn.Module], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(injected[0]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "GPT2Model" and result["model_type"] == "gpt2" and result["threshold"] == 0.05
    rows = [(b["name"], b["state"], round(b["alpha"], 4), b["ready"]) for b in result["blocks"]]
    assert rows == [("h.0.mlp", "injected", 0.3, False), ("h.1.mlp", "injected", 1.0, True)]
    assert result["savings"]["ready"] == {"blocks": ["h.1.mlp"], "params_saved": 4192 - 1056,
                                          "fraction": pytest.approx(3136 / result["parameters"])}
    assert result["savings"]["all"]["params_saved"] == 2 * 3136
    assert main(["inspect", str(injected[0]), "--threshold", "0.8"]) == 0
    text = capsys.readouterr().out
    assert "h.0.mlp  plain  injected (ready)" in text
    assert "collapsing the 2 injected blocks with |1-α| ≤ τ now would save 6,272" in text


def test_inspect_plain_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_model("vit").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layers.0.mlp  plain  plain" in out and "layers.1.mlp  plain  plain" in out
    assert "collapsing all 2 mergeable blocks" in out and "injected blocks" not in out


def test_inspect_counts_gated_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What inspect says collapsing would save is what collapse then saves, for gated blocks too."""
    torch.manual_seed(0)
    model = hlc.get_collapse_model(AutoModelForCausalLM.from_config(tiny_config("llama")).eval())
    first = next(iter(hlc.injected_activations(model).values()))
    first.alpha.data.fill_(1.0)
    model.save_pretrained(tmp_path / "injected")
    assert main(["inspect", str(tmp_path / "injected"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [b["kind"] for b in result["blocks"]] == ["gated", "gated"]
    ready = result["savings"]["ready"]
    assert len(ready["blocks"]) == 1 and ready["params_saved"] > 0
    assert ready["params_saved"] == hlc.collapse_model(model).params_saved


def test_collapse_matches_in_memory(injected: tuple[Path, torch.nn.Module], collapsed: Path) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(collapsed)
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    assert type(reloaded.transformer.h[1].mlp.c_fc).__name__ == "Identity"
    expected = AutoModelForCausalLM.from_pretrained(injected[0])
    report = hlc.collapse_model(expected)
    with torch.no_grad():  # the merge is exact: equal to the collapsed model and to the injected one (α = 1)
        assert torch.allclose(reloaded(IDS).logits, expected(IDS).logits, atol=1e-6)
        assert torch.allclose(reloaded(IDS).logits, injected[1](IDS).logits, atol=1e-5)
    assert model_params(reloaded) == report.model_params_after  # the kept block's α not counted
    saved = json.loads((collapsed / "layercollapse_report.json").read_text())
    assert saved == report.to_dict()
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in collapsed.iterdir()}


def test_a_local_base_model_is_not_taken_for_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A base model loaded from a relative local directory is not recorded: the card, rendered elsewhere, must not
    name it as its Hub base model (nor ask the Hub for its license); a Hub id is recorded."""
    monkeypatch.chdir(tmp_path)
    tiny_model("bert").save_pretrained("my-finetuned-bert")
    model = hlc.get_collapse_model(AutoModel.from_pretrained("my-finetuned-bert"))
    hlc.injected_activations(model)["encoder.layer.0"].alpha.data.fill_(1.0)
    hlc.collapse_model(model)
    assert getattr(model.config, RECORD_KEY)["base_model_name_or_path"] is None
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert hlc.render_model_card(model).data.base_model is None
    from_hub = tiny_model("bert")
    from_hub.name_or_path = "google-bert/bert-base-uncased"
    hlc.get_collapse_model(from_hub)
    hlc.injected_activations(from_hub)["encoder.layer.0"].alpha.data.fill_(1.0)
    hlc.collapse_model(from_hub)
    assert getattr(from_hub.config, RECORD_KEY)["base_model_name_or_path"] == "google-bert/bert-base-uncased"
    assert hlc.render_model_card(from_hub).data.base_model == "google-bert/bert-base-uncased"


def test_card_of_a_planner_collapsed_model_says_so(tmp_path: Path) -> None:
    """Blocks merged by the calibration planner were not fine-tuned: the card says how they were replaced, and
    counts the block the plan left (in the report of collapse_model and in the one rebuilt from the checkpoint)."""
    torch.manual_seed(0)
    config = tiny_config("gpt2")
    config.n_layer = 3
    model = AutoModelForCausalLM.from_config(config).eval()
    data = [{"input_ids": torch.randint(1, 90, (4, 10), generator=torch.Generator().manual_seed(i))}
            for i in range(4)]
    plan = hlc.plan_collapse(model, data, num_blocks=2, show_progress=False)
    report = hlc.collapse_model(model, plan=plan)
    chosen = {p.name for p in plan.selected}
    rows = [(b.name, b.status) for b in report.blocks]
    assert rows == [(f"transformer.h.{i}.mlp", "collapsed" if f"transformer.h.{i}.mlp" in chosen else "kept")
                    for i in range(3)]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [(b.name, b.status) for b in build_collapse_report(reloaded).blocks] == rows
    text = hlc.render_model_card(reloaded).text
    assert " ".join(text.split()).count("2 of its 3 MLP blocks were replaced by a single projection each, chosen on "
                                        "calibration data without fine-tuning") == 1
    assert "calibration planner" in text and "Fine-tuning added" not in text
    assert ("relative least squares" in text) == ("relative_least_squares" in {p.method for p in plan.selected})


def _prose(card) -> str:
    return " ".join(card.text.split())


def test_card_counts_every_block_and_describes_the_activation() -> None:
    """With collapse_model's own report (which lists the injected blocks), the card still counts every MLP block of
    the model; one block takes the singular; PReLU is described as the paper's activation, and a block merged by the
    planner afterwards gets its own paragraph."""
    torch.manual_seed(0)
    model = hlc.get_collapse_model(tiny_model("bert"), hlc.LayerCollapseConfig(layers_to_transform=[1]))
    hlc.injected_activations(model)["encoder.layer.1"].alpha.data.fill_(1.0)
    report = hlc.collapse_model(model)
    assert len(report.blocks) == 1
    text = _prose(hlc.render_model_card(model, report))
    assert "1 of its 2 MLP blocks was replaced by a single projection, after fine-tuning made it linear" in text
    assert "which leaves the block as it was at α = 0" in text and "calibration planner" not in text
    data = [{"input_ids": torch.randint(1, 90, (4, 10), generator=torch.Generator().manual_seed(i))}
            for i in range(4)]
    hlc.collapse_model(model, plan=hlc.plan_collapse(model, data, num_blocks=1, show_progress=False))
    text = _prose(hlc.render_model_card(model))
    assert "2 of its 2 MLP blocks were replaced by a single projection each (1 fine-tuned until linear and merged " \
           "exactly, 1 chosen on calibration data without fine-tuning)" in text
    assert "Fine-tuning added λ·Σ(1−α)²" in text and "The calibration planner" in text
    prelu = hlc.get_collapse_model(tiny_model("bert"), hlc.LayerCollapseConfig(activation="prelu"))
    for act in hlc.injected_activations(prelu).values():
        act.alpha.data.fill_(1.0)
    text = _prose(hlc.render_model_card(prelu, hlc.collapse_model(prelu)))
    assert "the paper's PReLU of slope α, which replaces the original activation" in text
    assert "leaves the block as it was" not in text


def test_collapse_named_blocks(injected: tuple[Path, torch.nn.Module], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _errors(capsys, ["collapse", str(injected[0]), str(tmp_path / "a"), "--blocks", "h.0.mlp"])
    assert code == 1 and "farther than threshold" in line
    assert main(["collapse", str(injected[0]), str(tmp_path / "b"), "--blocks", "h.0.mlp", "--force"]) == 0
    plan = json.loads((tmp_path / "b" / "config.json").read_text())["layercollapse"]["blocks"]
    assert {name: entry["state"] for name, entry in plan.items()} == {"h.0.mlp": "collapsed", "h.1.mlp": "injected"}
    assert main(["collapse", str(injected[0]), str(tmp_path / "c"), "--threshold", "0.8"]) == 0
    assert "collapsed 2 of 2 blocks" in capsys.readouterr().out


def test_card(collapsed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = tmp_path / "training.json"
    info.write_text(json.dumps({"steps": 1234, "learning_rate": 1e-4}))
    output = tmp_path / "card" / "README.md"
    argv = ["card", str(collapsed), "--output", str(output), "--license", "apache-2.0", "--repo-id", "me/tiny",
            "--training-info", str(info)]
    assert main(argv) == 0
    card = ModelCard.load(output)
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers" and "layercollapse" in card.data.tags
    assert "| `transformer.h.1.mlp` | plain | 1.0000 | collapsed |" in card.text
    assert "a plain block's activation is the identity, so the block is W₂·W₁" in card.text
    assert "Fine-tuning added λ·Σ(1−α)²" in card.text and "calibration planner" not in card.text
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny")' in card.text
    assert "| steps | 1234 |" in card.text and "| learning_rate | 0.0001 |" in card.text
    assert (output.parent / "layercollapse_chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bare = tmp_path / "bare"  # no saved report: the card rebuilds it from the plan and a meta-device model
    shutil.copytree(collapsed, bare, ignore=shutil.ignore_patterns("layercollapse_report.json"))
    assert main(["card", str(bare), "--license", "mit"]) == 0
    text = (bare / "README.md").read_text()
    assert "| `transformer.h.1.mlp` | plain | 1.0000 | collapsed | 4,192 → 1,056 | 8,192 → 2,048 |" in text
    assert "| parameters | 22,368 | 19,232 | -14.02% |" in text and "# bare" in text
    template = tmp_path / "mine.md"
    template.write_text("---\n{{ card_data }}\n---\n{{ model_name }}: {{ num_collapsed }}/{{ num_blocks }}\n")
    assert main(["card", str(collapsed), "--output", str(output), "--template", str(template), "--license", "mit"]) == 0
    assert ModelCard.load(output).text.strip() == "out: 1/2"


def test_errors(injected: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain"
    tiny_model("bert").save_pretrained(plain)
    cases = [
        (["collapse", str(tmp_path / "missing"), str(tmp_path / "out")], "no such directory"),
        (["collapse", str(plain), str(tmp_path / "out")], "not a LayerCollapse checkpoint"),
        (["card", str(plain)], "not a LayerCollapse checkpoint"),
        (["push", str(plain), "me/x"], "not a LayerCollapse checkpoint"),
        (["collapse", str(injected[0]), str(injected[0])], "OUT_DIR must differ"),
        (["inspect", "not-a-dir"], "no such directory, and not loadable as a Hub repo id"),  # tried on the Hub
        (["inspect", str(tmp_path / "missing")], "no such directory (and not a Hub repo id)"),
        (["card", str(injected[0]), "--training-info", str(tmp_path / "nope.json")], "nope.json: no such file"),
    ]
    for argv, message in cases:
        code, line = _errors(capsys, argv)
        assert code == 1 and message in line, (argv, line)
    assert main(["collapse", str(plain)]) == 2  # usage error from argparse
    assert "required: OUT_DIR" in capsys.readouterr().err


def test_plan_then_collapse_with_the_plan(injected: tuple[Path, torch.nn.Module], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    directory, _ = injected
    data = tmp_path / "calibration.txt"
    data.write_text("\n".join(["hello hello", "hello", "hello hello hello", "hello world"] * 4))
    plan_dir, out = tmp_path / "plan", tmp_path / "planned"
    assert main(["plan", str(directory), "--data", str(data), "--output", str(plan_dir), "--num-blocks", "1",
                 "--max-length", "8", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "language-modelling loss" in printed and "transformer.h." in printed
    plan = hlc.CollapsePlan.load(plan_dir)
    assert len(plan.selected) == 1
    assert main(["collapse", str(directory), str(out), "--plan", str(plan_dir)]) == 0
    expected = AutoModelForCausalLM.from_pretrained(directory).eval()
    hlc.collapse_model(expected, plan=plan)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected(IDS).logits, atol=1e-6, rtol=0)
    code, message = _errors(capsys, ["plan", str(directory), "--data", str(tmp_path / "missing.txt"), "--output",
                                     str(plan_dir), "--num-blocks", "1"])
    assert code == 1 and "no such file" in message


def test_plan_layers_and_spans_of_a_decoder_then_collapse_to_a_stock_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`plan --units layer,span --num-params`: the table names each unit's kind; `collapse --plan` cuts the layers
    and writes a stock Llama checkpoint (no LayerCollapse record) that says so."""
    from helpers import HEADS, TEXT

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**TEXT, "num_hidden_layers": 5}, num_key_value_heads=HEADS)
    model = AutoModelForCausalLM.from_config(config).eval()
    source = tmp_path / "llama"
    model.save_pretrained(source)
    (source / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
    BertTokenizer(str(source / "vocab.txt")).save_pretrained(source)
    data = tmp_path / "calibration.txt"
    data.write_text("\n".join(["hello world hello", "world hello", "hello hello world world"] * 8))
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert main(["plan", str(source), "--data", str(data), "--output", str(tmp_path / "plan"), "--units",
                 "layer,span", "--num-params", str(layer), "--max-length", "8", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert " span " in printed and "held-out fit" in printed
    assert main(["collapse", str(source), str(tmp_path / "out"), "--plan", str(tmp_path / "plan")]) == 0
    printed = capsys.readouterr().out
    assert "stock LlamaForCausalLM" in printed
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["num_hidden_layers"] < 5 and "layercollapse" not in saved
    code, message = _errors(capsys, ["plan", str(source), "--data", str(data), "--output", str(tmp_path / "p2"),
                                     "--units", "mlp,blocks", "--num-params", "10"])
    assert code == 1 and "units=" in message


def test_inspect_memory_estimates_the_affine_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model("vit")
    model.save_pretrained(tmp_path)
    expected = hlc.estimate_memory(model, hlc.LayerCollapseConfig(linear_target="affine"))
    assert main(["inspect", str(tmp_path), "--json", "--memory", "affine"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["linear_target"] == "affine" and memory["added_parameters"] == expected.added_parameters
    assert memory["optimizer_bytes"] == 2 * 4 * expected.trainable_parameters  # AdamW, fp32
    assert main(["inspect", str(tmp_path), "--memory"]) == 0
    assert "Memory added by LayerCollapse (linear_target='default', AdamW)" in capsys.readouterr().out


def test_inspect_memory_of_the_low_rank_affine_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model("vit")
    model.save_pretrained(tmp_path)
    expected = hlc.estimate_memory(model, hlc.LayerCollapseConfig(linear_target="affine", affine_rank=4))
    full = hlc.estimate_memory(model, hlc.LayerCollapseConfig(linear_target="affine"))
    assert main(["inspect", str(tmp_path), "--json", "--memory", "affine", "--affine_rank", "4"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["affine_rank"] == 4 and memory["trainable_parameters"] == expected.trainable_parameters
    assert expected.trainable_parameters < full.trainable_parameters
    code, message = _errors(capsys, ["inspect", str(tmp_path), "--memory", "fitted", "--affine_rank", "4"])
    assert code == 1 and "affine_rank=4" in message and "linear_target='affine'" in message
