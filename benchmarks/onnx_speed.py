"""Latency of collapsed vs original models in PyTorch and in onnxruntime (`export_onnx`), side by side.

    python benchmarks/onnx_speed.py            # all-MiniLM-L6-v2 (sequence classification), SmolLM2-135M (causal LM)
    python benchmarks/onnx_speed.py --quick    # CI smoke run on tiny random models (numbers are not results)

For each model the original and a collapsed copy are exported with ``hf_layercollapse.export_onnx`` (checked in
onnxruntime against PyTorch, atol 1e-4), then the four variants (PyTorch / onnxruntime × original / collapsed) run
on the same random token batches (batch 1 and 8, sequence 128), interleaved repetition by repetition after warm-up,
with 1 thread and with the default thread count (torch's default; onnxruntime's intra-op default); the table reports
medians. The blocks' α is set to 1 without training: the models measure speed, not quality. The ideal speed-up is the
ratio of FLOPs per token (projections, the LM head included, and attention scores).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import RESULTS, assets, environment, markdown_table, write_results
from speed import flops_per_token
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.utils import logging

import hf_layercollapse as hlc

#: name → (how it is built, collapsed layers, repetitions, warm-up runs, atol of the export check). SmolLM2's logits
#: reach ±35 after 30 layers: PyTorch's own float32 result differs from float64 by ~1e-4 there (the table's last
#: column), so its check uses 1e-3 (a relative difference of ~3e-5); the others use the default 1e-4.
MODELS = {
    "all-MiniLM-L6-v2 (sequence classification)": ("minilm", [3, 4, 5], 15, 3, 1e-4),
    "SmolLM2-135M (causal LM)": ("smollm2", [2, 9, 16, 23], 5, 1, 1e-3),
}
QUICK = {
    "tiny BERT (sequence classification)": ("bert", [1], 2, 1, 1e-4),
    "tiny Llama (causal LM)": ("llama", [1], 2, 1, 1e-4),
}
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
COLUMNS = ["model", "batch", "threads", "PyTorch original (ms)", "PyTorch collapsed (ms)", "PyTorch speed-up",
           "onnxruntime original (ms)", "onnxruntime collapsed (ms)", "onnxruntime speed-up", "ideal (FLOPs)",
           "onnxruntime ÷ PyTorch latency (collapsed)"]
MODEL_COLUMNS = ["model", "collapsed blocks", "params original → collapsed", "export (s)", "export check atol",
                 "max abs diff ORT − PyTorch, export check", "max abs diff ORT − PyTorch, largest batch",
                 "max abs diff PyTorch fp32 − fp64, batch 1"]


def original_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the classification head is not in the checkpoint: seeded random
    if kind == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
    if kind == "smollm2":
        return AutoModelForCausalLM.from_pretrained(assets.smollm2_path(), dtype=torch.float32)
    config = AutoConfig.for_model(kind, **TINY, **({"num_key_value_heads": 4} if kind == "llama" else {}))
    auto = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    return auto.from_config(config)


def collapsed_copy(model: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """A copy with the MLP blocks of ``layers`` collapsed, their α forced to 1 (no training: a speed measurement)."""
    collapsed = copy.deepcopy(model)
    hlc.get_collapse_model(collapsed, hlc.LayerCollapseConfig(layers_to_transform=layers))
    for activation in hlc.injected_activations(collapsed).values():
        activation.alpha.data.fill_(1.0)
    report = hlc.collapse_model(collapsed)
    assert len(report.collapsed) == len(layers), report
    return collapsed.eval()


def session(path: Path, threads: int) -> ort.InferenceSession:
    """onnxruntime on the CPU with ``threads`` intra-op threads (0: onnxruntime's default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runners(models: dict[str, torch.nn.Module], sessions: dict[str, ort.InferenceSession],
            inputs: dict[str, torch.Tensor]) -> dict[tuple[str, str], Callable[[], np.ndarray]]:
    """(runtime, variant) → one forward pass returning the logits."""
    feeds = {k: v.numpy() for k, v in inputs.items()}

    def torch_run(model: torch.nn.Module) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            with torch.inference_mode():
                return model(**inputs, **no_cache(model)).logits.numpy()

        return run

    table = {("PyTorch", name): torch_run(model) for name, model in models.items()}
    table.update({("onnxruntime", name): (lambda s=s: s.run(["logits"], feeds)[0]) for name, s in sessions.items()})
    return table


def timed(run: Callable[[], np.ndarray]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def medians(table: dict[tuple[str, str], Callable[[], np.ndarray]], reps: int, warmup: int) -> dict:
    """Median seconds of each runner, the runners interleaved repetition by repetition."""
    times: dict[tuple[str, str], list[float]] = {key: [] for key in table}
    for rep in range(warmup + reps):
        for key, run in table.items():
            elapsed = timed(run)
            if rep >= warmup:
                times[key].append(elapsed)
    return {key: statistics.median(values) for key, values in times.items()}


def random_batch(model: torch.nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def no_cache(model: torch.nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for the models that take it (as the ONNX export does)."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@torch.inference_mode()
def fp64_gap(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """max |fp32 − fp64| of the PyTorch logits: the float32 noise floor any other fp32 runtime faces."""
    double = copy.deepcopy(model).double()
    options = no_cache(model)
    return float((model(**inputs, **options).logits.double() - double(**inputs, **options).logits).abs().max())


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def benchmark_model(label: str, spec: tuple, args: argparse.Namespace, folder: Path, default_threads: int,
                    rows: list[dict], model_rows: list[dict]) -> None:
    kind, layers, reps, warmup, atol = spec
    reps, warmup = args.reps or reps, args.warmup if args.warmup is not None else warmup
    atol = args.atol if args.atol is not None else atol
    original = original_model(kind).eval()
    models = {"original": original, "collapsed": collapsed_copy(original, layers)}
    paths, checks, seconds = {}, {}, {}
    for name, model in models.items():
        started = time.perf_counter()
        paths[name] = folder / f"{kind}-{name}.onnx"
        checks[name] = hlc.export_onnx(model, paths[name], atol=atol).max_abs_diff
        seconds[name] = time.perf_counter() - started
        print(f"{label}: exported {name} in {seconds[name]:.0f} s, max |ORT − PyTorch| {checks[name]:.2g}", flush=True)
    ideal = flops_per_token(original, args.seq) / flops_per_token(models["collapsed"], args.seq)
    gaps: dict[str, float] = {}
    for threads in [default_threads if t == 0 else t for t in args.threads]:
        torch.set_num_threads(threads)
        sessions = {name: session(path, threads if threads < default_threads else 0)
                    for name, path in paths.items()}
        for batch in args.batches:
            inputs = random_batch(original, batch, args.seq)
            table = runners(models, sessions, inputs)
            if batch == max(args.batches) and threads == 1:
                for name in models:
                    gaps[name] = float(np.abs(table["onnxruntime", name]() - table["PyTorch", name]()).max())
            result = medians(table, reps, warmup)
            rows.append(row(label, batch, threads, default_threads, result, ideal))
            print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        del sessions
    torch.set_num_threads(1)
    floor_inputs = random_batch(original, 1, args.seq)
    floors = {name: fp64_gap(model, floor_inputs) for name, model in models.items()}
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    model_rows.append({
        "model": label, "collapsed blocks": f"{len(layers)} (layers {', '.join(map(str, layers))})",
        "params original → collapsed": f"{params['original']:,} → {params['collapsed']:,}",
        "export (s)": f"{seconds['original']:.0f} / {seconds['collapsed']:.0f}", "export check atol": f"{atol:g}",
        "max abs diff ORT − PyTorch, export check": " / ".join(f"{checks[n]:.2g}" for n in models),
        "max abs diff ORT − PyTorch, largest batch": " / ".join(f"{gaps[n]:.2g}" for n in models),
        "max abs diff PyTorch fp32 − fp64, batch 1": " / ".join(f"{floors[n]:.2g}" for n in models)})


def row(label: str, batch: int, threads: int, default_threads: int, result: dict, ideal: float) -> dict:
    torch_speedup = result["PyTorch", "original"] / result["PyTorch", "collapsed"]
    ort_speedup = result["onnxruntime", "original"] / result["onnxruntime", "collapsed"]
    return {"model": label, "batch": batch, "threads": "1" if threads == 1 else f"default ({default_threads})",
            "PyTorch original (ms)": ms(result["PyTorch", "original"]),
            "PyTorch collapsed (ms)": ms(result["PyTorch", "collapsed"]), "PyTorch speed-up": f"{torch_speedup:.3f}",
            "onnxruntime original (ms)": ms(result["onnxruntime", "original"]),
            "onnxruntime collapsed (ms)": ms(result["onnxruntime", "collapsed"]),
            "onnxruntime speed-up": f"{ort_speedup:.3f}", "ideal (FLOPs)": f"{ideal:.3f}",
            "onnxruntime ÷ PyTorch latency (collapsed)":
                f"{result['onnxruntime', 'collapsed'] / result['PyTorch', 'collapsed']:.3f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models, few repetitions (not results)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="the largest also measures the "
                        "ORT − PyTorch difference")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="torch / onnxruntime intra-op threads to measure (0: each runtime's default)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 15 MiniLM, 5 SmolLM2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default: 3 MiniLM, 1 SmolLM2)")
    parser.add_argument("--atol", type=float, default=None,
                        help="tolerance of the export check (default: 1e-4 MiniLM, 1e-3 SmolLM2)")
    args = parser.parse_args()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    default_threads = torch.get_num_threads()
    specs = QUICK if args.quick else MODELS
    if args.quick:
        args.seq, args.batches = 16, [1, 2]
    rows: list[dict] = []
    model_rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for label, spec in specs.items():
            benchmark_model(label, spec, args, Path(folder), default_threads, rows, model_rows)
    print(markdown_table(model_rows, MODEL_COLUMNS))
    if args.quick:
        print(markdown_table(rows, COLUMNS))
        print("quick run: tiny random models, the numbers are not results")
        return
    env = dict(environment(), torch_threads=args.threads, onnxruntime=ort.__version__,
               minutes=round((time.perf_counter() - started) / 60, 1))
    checks = markdown_table(model_rows, MODEL_COLUMNS)
    notes = (f"Models, exports and numerical checks (original / collapsed):\n\n{checks}"
             f"\n\nSequence {args.seq}, random token ids, full attention masks; medians of the timed repetitions "
             "after warm-up, the four variants interleaved. Speed-up = original latency ÷ collapsed latency in the "
             "same runtime. The collapsed blocks' α was set to 1 without training (a speed measurement: the outputs "
             "are not those of a trained model). onnxruntime "
             f"{ort.__version__}, CPUExecutionProvider, graph optimizations on, intra-op threads as torch's "
             f"({', '.join(map(str, args.threads))}; 0: each runtime's default). The SmolLM2 logits (all "
             "positions, 49,152 per token) are "
             "part of every forward pass in both runtimes. The fp32 − fp64 difference is the float32 noise floor "
             "of the model itself (batch 1): a second fp32 runtime cannot be expected to match PyTorch much closer "
             f"than that. {env['minutes']} minutes in all.")
    write_results("onnx_speed", "Collapsed vs original in PyTorch and onnxruntime (CPU)", rows, COLUMNS, notes)
    path = RESULTS / "onnx_speed.json"  # with the models' table and the environment of onnxruntime
    data = json.loads(path.read_text())
    data["environment"], data["models"] = env, model_rows
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
