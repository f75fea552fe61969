"""`export_onnx` and ``hf-layercollapse export --onnx``: collapsed models (plain GELU and gated SiLU MLPs) run in
onnxruntime with the outputs of transformers, on other batch and sequence sizes than the export's, with fewer
MatMul weights than the original; failed checks and bad arguments raise errors that say what to do."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import D, H, set_alphas, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_layercollapse as hlc
from hf_layercollapse import export as export_module
from hf_layercollapse.cli import main
from hf_layercollapse.export import ONNXVerificationError, export_onnx

ATOL = 1e-4
#: Parameters of the MatMul weights one collapsed block removes: d→h→d (plain) or gate, up d→h and down h→d
#: (gated) become one d→d projection (biases are Add inputs, not MatMul weights).
MATMUL_SAVED = {"bert": 2 * D * H - D * D, "llama": 3 * D * H - D * D}


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny BERT for sequence classification (GELU MLP) or Llama causal LM (gated SiLU MLP), in eval mode."""
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    config = tiny_config(arch)
    if arch == "bert":
        config.num_labels = 3
    return auto.from_config(config).eval()


def collapsed(arch: str) -> torch.nn.Module:
    """Every block injected, block 0 at α = 1 (collapsed), block 1 at α = 0.3 (stays injected)."""
    model = hlc.get_collapse_model(tiny(arch))
    set_alphas(model, 1.0, 0.3)
    report = hlc.collapse_model(model)
    assert [b.status for b in report.blocks] == ["collapsed", "kept"]
    return model


def batch(batch_size: int, seq: int, seed: int, pad: str = "right") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch_size, seq), generator=generator)
    mask = torch.ones_like(ids)
    if pad == "right":
        mask[0, -3:] = 0
    elif pad == "left":
        mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def ort_logits(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]


def torch_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits.numpy()


def matmul_weights(path: Path) -> int:
    """Elements of the initializers that are inputs of MatMul/Gemm nodes (the projection weights)."""
    graph = onnx.load(str(path)).graph
    sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}
    used = {name for node in graph.node if node.op_type in ("MatMul", "Gemm") for name in node.input}
    return sum(sizes[name] for name in used & set(sizes))


@pytest.fixture(scope="module", params=["bert", "llama"])
def exported(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path, Path, hlc.ExportResult]:
    """(arch, collapsed model, its ONNX file, the original model's ONNX file, the collapsed export's result)."""
    arch = request.param
    folder = tmp_path_factory.mktemp(f"onnx-{arch}")
    model = collapsed(arch)
    result = export_onnx(model, folder / "collapsed.onnx")
    export_onnx(tiny(arch), folder / "original.onnx")
    return arch, model, folder / "collapsed.onnx", folder / "original.onnx", result


def test_export_is_verified_on_two_batch_and_sequence_sizes(exported) -> None:
    _, _, path, _, result = exported
    assert result.path == path and path.is_file()
    assert result.input_names == ("input_ids", "attention_mask")
    assert result.output_names == ("logits",)  # the causal LM has no KV cache outputs
    assert result.max_abs_diff is not None and result.max_abs_diff < ATOL
    assert result.opset >= 18
    main_shapes = [shapes["input_ids"] for shapes in result.verified_shapes]
    assert main_shapes == [(2, 8), (3, 11)]
    assert "max |difference|" in str(result)
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(path)).graph.input]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]
    assert not list(path.parent.glob(".onnx-export-*"))  # the temporary folder is gone


@pytest.mark.parametrize("shape, pad", [((1, 5), "right"), ((4, 23), "right"), ((3, 17), "left")])
def test_onnxruntime_matches_transformers_on_other_shapes(exported, shape, pad) -> None:
    arch, model, path, _, _ = exported
    inputs = batch(*shape, seed=sum(shape), pad=pad if shape[0] > 1 else "none")
    expected, actual = torch_logits(model, inputs), ort_logits(path, inputs)
    assert actual.shape == expected.shape
    keep = inputs["attention_mask"].bool().numpy() if arch == "llama" else slice(None)
    # a left-padded decoder token attends to nothing: its logits are arbitrary, the others must match
    assert np.abs(actual[keep] - expected[keep]).max() < ATOL


def test_collapsed_graph_has_fewer_matmul_weights(exported) -> None:
    arch, _, path, original, _ = exported
    assert matmul_weights(original) - matmul_weights(path) == MATMUL_SAVED[arch]


def test_cli_exports_a_saved_collapsed_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = collapsed("bert")
    model.save_pretrained(tmp_path / "collapsed")
    out = tmp_path / "onnx" / "model.onnx"
    assert main(["export", str(tmp_path / "collapsed"), "--onnx", str(out), "--opset", "18"]) == 0
    printed = capsys.readouterr().out
    assert f"exported {out}" in printed and "ONNX opset 18" in printed and "max |difference|" in printed
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "collapsed").eval()
    inputs = batch(3, 13, seed=1)
    assert np.abs(ort_logits(out, inputs) - torch_logits(loaded, inputs)).max() < ATOL
    assert np.abs(ort_logits(out, inputs) - torch_logits(model, inputs)).max() < ATOL


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "m.onnx")]) == 1
    assert "missing: no such directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2  # --onnx is required
    assert "--onnx" in capsys.readouterr().err


def _corrupting(original):
    """``_export`` that writes the file, then adds 1 to the classifier's weights in it (a wrong export)."""

    def export(forward, inputs, draft, opset):
        original(forward, inputs, draft, opset)
        proto = onnx.load(str(draft))
        for init in proto.graph.initializer:
            if "classifier.weight" in init.name:
                init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + 1, init.name))
        onnx.save(proto, str(draft))

    return export


def test_a_failed_check_names_the_output_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_module, "_export", _corrupting(export_module._export))
    model = collapsed("bert").train()
    with pytest.raises(ONNXVerificationError, match=r"output 'logits' differs from PyTorch's by .* \(> atol=0\.0001\)"):
        export_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file nor the temporary folder
    assert model.training  # the mode is restored
    recorded = {name: act.last_alpha for name, act in hlc.injected_activations(model).items()}
    result = export_onnx(model, tmp_path / "model.onnx", verify=False)
    assert result.max_abs_diff is None and (tmp_path / "model.onnx").is_file() and "not verified" in str(result)
    # what the injected block's forward recorded is put back after the export's traced forward
    assert all(act.last_alpha is recorded[name] for name, act in hlc.injected_activations(model).items())


def test_argument_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny("bert")
    with pytest.raises(ValueError, match=r"atol=-1: give a finite number"):
        export_onnx(model, tmp_path / "m.onnx", atol=-1)
    with pytest.raises(ValueError, match=r"opset='18': give a positive integer"):
        export_onnx(model, tmp_path / "m.onnx", opset="18")
    with pytest.raises(ValueError, match=r"is a directory: give a file path such as"):
        export_onnx(model, tmp_path)
    with pytest.raises(ValueError, match=r"example_inputs\['input_ids'\] is a list: ONNX inputs are tensors"):
        export_onnx(model, tmp_path / "m.onnx", {"input_ids": [[1, 2, 3]]})
    with pytest.raises(TypeError, match=r"model=str: export_onnx takes a torch.nn.Module"):
        export_onnx("bert-base-uncased", tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"needs the 'onnxruntime' package.*pip install 'hf-layercollapse\[onnx\]'"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.assets
def test_real_minilm_sequence_classifier(minilm_path: Path, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 with a 3-label head, its last 3 of 6 MLP blocks collapsed (α set to 1), exported
    with a tokenized batch of real text and checked on it and on another batch/sequence size."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3).eval()
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[3, 4, 5]))
    set_alphas(model, 1.0)
    assert len(hlc.collapse_model(model).collapsed) == 3
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    inputs = tokenizer(["Collapsed blocks are one projection.", "A short one."], padding=True, return_tensors="pt")
    result = export_onnx(model, tmp_path / "minilm.onnx", dict(inputs))
    assert result.input_names == ("input_ids", "token_type_ids", "attention_mask")
    assert result.max_abs_diff < ATOL
    other = tokenizer(["An example.", "Another, longer example of a sentence to classify.", "Third."], padding=True,
                      return_tensors="pt")
    session = ort.InferenceSession(str(tmp_path / "minilm.onnx"), providers=["CPUExecutionProvider"])
    actual = session.run(["logits"], {k: v.numpy() for k, v in other.items()})[0]
    assert np.abs(actual - torch_logits(model, dict(other))).max() < ATOL
