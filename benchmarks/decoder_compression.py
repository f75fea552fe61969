"""Compressing a decoder LLM without training: the planner against the training-free depth pruners users pick instead.

The real SmolLM2-135M (30 Llama-style layers, 3.54M parameters each), calibrated on one text and measured on held-out
text of two kinds: Shakespeare plays not used for calibration (Hamlet, Julius Caesar, The Tempest, Twelfth Night)
and the Python 3.11 documentation (Debian's ``python3.11-doc``: modern technical prose; calibration on half the
files, held-out on the other half). Every method gets the same calibration windows (256 tokens each) and the same
budget, given as a number of decoder layers' worth of parameters (2, 4, 5, 8 layers: 5.3, 10.5, 13.2, 21.1% of the
model); each removes at least that many. Methods, the peers implemented here from their papers:

* ``shortgpt`` (Men et al. 2024): remove the layers with the lowest Block Influence ``1 − mean cos(h_in, h_out)``
  (layers 1 and up: layer 0 is never the least influential).
* ``replaceme`` (Shopkhoev et al. 2025, least-squares variant): the span of ``n`` consecutive layers whose input and
  output hidden states are closest in mean cosine distance; one map ``T`` fitted by least squares so that the MLP
  output of the layer before the span, times ``T``, plus that layer's residual approximates the hidden state after
  the span (a second pass for its statistics); ``T`` fused into that layer's ``down_proj``; the span removed.
* ``planner-mlp``: ``plan_collapse(units="mlp")``, the measured MLP-only planner (merged MLP blocks).
* ``planner``: ``plan_collapse(units="mlp,layer,span")``, the one-pass planner over MLP blocks, layers and spans.

Each job runs in a fresh process (one torch thread on the CPU) whose wall time, CPU time and peak resident-set
growth during the method are recorded. ``--device cuda --dtype bfloat16``: the model's weights and forward passes on
the GPU in bf16 (the planner's statistics stay fp32 products summed in fp64); the wall time is taken after
``torch.cuda.synchronize``, the peak GPU memory is recorded and CPU time is not (it measures nothing of the GPU's
work). A job that fails is reported and the others run. ``--quick`` runs one tiny job of each method (CI).

    python benchmarks/decoder_compression.py                       # the grid: both calibration texts, 16k tokens
    python benchmarks/decoder_compression.py --sweep               # calibration sizes 4k / 16k / 64k, 4 layers
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import RESULTS, add_device_arguments, configure, describe, environment, markdown_table, new_plot, save_plot

WINDOW = 256
EVAL_WINDOWS = 32  # 8k held-out tokens per text
BUDGET_LAYERS = (2, 4, 5, 8)
METHODS = ("shortgpt", "replaceme", "planner-mlp", "planner")
DOMAINS = ("shakespeare", "python")


# ------------------------------------------------------------------------------------------------------ data
def texts():
    from common import assets

    plays = assets.load_shakespeare()
    docs = assets.load_python_docs()
    return {"shakespeare": (list(plays["train"]["text"]), list(plays["validation"]["text"])),
            "python": (docs[::2], docs[1::2])}


def windows(tokenizer, texts_: list[str], count: int, seed: int):
    """``count`` windows of 256 tokens drawn (without repeats, seeded) from the concatenated texts."""
    import torch

    ids: list[int] = []
    for text in texts_:
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) > 3 * (count + 1) * WINDOW:
            break
    if len(ids) < (count + 1) * WINDOW:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than {count} windows of {WINDOW}")
    starts = torch.randperm(len(ids) // WINDOW - 1, generator=torch.Generator().manual_seed(seed))[:count]
    return torch.tensor([ids[s * WINDOW:(s + 1) * WINDOW] for s in sorted(starts.tolist())])


def batches(ids, size: int = 8) -> list[dict]:
    return [{"input_ids": ids[i:i + size]} for i in range(0, len(ids), size)]


# ------------------------------------------------------------------------------------------------------ peers
class Hidden:
    """Hooks on every decoder layer: its input and output hidden states of the last forward pass, and the MLP
    output of each layer."""

    def __init__(self, model, stack) -> None:
        self.states, self.handles = {}, []
        layers = stack.layers(model)
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(
                lambda m, a, k, i=i: self.states.__setitem__(("in", i), a[0] if a else k["hidden_states"]),
                with_kwargs=True))
            self.handles.append(layer.register_forward_hook(
                lambda m, a, o, i=i: self.states.__setitem__(("out", i), o[0] if isinstance(o, tuple) else o)))
            self.handles.append(stack.mlps[i].owner(model).register_forward_hook(
                lambda m, a, o, i=i: self.states.__setitem__(("mlp", i), o)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _cos(a, b):
    import torch

    return torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]).float(),
                                                 b.reshape(-1, b.shape[-1]).float(), dim=-1)


def shortgpt(model, calibration, n: int):
    """Remove the ``n`` layers (from layer 1) of lowest Block Influence on the calibration windows."""
    import torch

    import hf_layercollapse as hlc
    from hf_layercollapse.units import Cut, cut_layers, decoder_stack

    stack = decoder_stack(model, hlc.find_mlp_blocks(model))
    hidden = Hidden(model, stack)
    influence = torch.zeros(len(stack), dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for batch in calibration:
            model(**batch)
            for i in range(len(stack)):
                influence[i] += float((1 - _cos(hidden.states["in", i], hidden.states["out", i])).sum())
            tokens += batch["input_ids"].numel()
    hidden.remove()
    influence[0] = math.inf
    chosen = sorted(influence.argsort()[:n].tolist())
    cut_layers(model, stack, [Cut(stack.span(i, 1).layout) for i in chosen])
    return {"layers": chosen}


def replaceme(model, calibration, n: int):
    """ReplaceMe (least squares): the span of ``n`` layers with the lowest mean cosine distance between its input and
    output; ``T`` fitted on a second pass; fused into the layer before it."""
    import torch

    import hf_layercollapse as hlc
    from hf_layercollapse.statistics import ResidualFitStats
    from hf_layercollapse.units import Cut, cut_layers, decoder_stack

    stack = decoder_stack(model, hlc.find_mlp_blocks(model))
    hidden = Hidden(model, stack)
    count = len(stack)
    distance = torch.zeros(count, dtype=torch.float64)
    with torch.no_grad():
        for batch in calibration:
            model(**batch)
            for s in range(1, count - n + 1):
                distance[s] += float((1 - _cos(hidden.states["in", s], hidden.states["out", s + n - 1])).sum())
        distance[0] = math.inf
        distance[count - n + 1:] = math.inf
        start = int(distance.argmin())
        stats = None
        for batch in calibration:  # the second pass: the statistics of the chosen span
            model(**batch)
            m = hidden.states["mlp", start - 1].reshape(-1, hidden.states["mlp", start - 1].shape[-1])
            residual = hidden.states["in", start].reshape(m.shape) - m
            target = hidden.states["out", start + n - 1].reshape(m.shape) - residual
            if stats is None:
                stats = ResidualFitStats(m.shape[1], m.shape[1], 1, m.device)
            stats.update(m, [target], torch.ones(m.shape[0], device=m.device))
    hidden.remove()
    transform = stats.solve(0, ridge=1e-8)
    cut_layers(model, stack, [Cut(stack.span(start, n).layout, transform)])
    return {"span": [start, start + n - 1]}


# ------------------------------------------------------------------------------------------------------ one job
def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


class Peak(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base = self.peak = _rss()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)


def worker(job: dict) -> dict:
    import torch
    from common import assets, resolve_placement
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import hf_layercollapse as hlc

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(job["threads"])
    placement = resolve_placement(job.get("device", "cpu"), job.get("dtype", "float32"), training=False)
    device, cuda = placement.device, placement.device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)
    path = assets.smollm2_path() if not job.get("tiny") else job["tiny"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    corpus = texts()
    calibration = batches(windows(tokenizer, corpus[job["calibration"]][0], job["windows"], seed=1).to(device))
    held_out = {d: windows(tokenizer, corpus[d][1], job["eval_windows"], seed=2).to(device) for d in DOMAINS}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=placement.dtype).to(device).eval()
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())  # every layer has the same size
    total = sum(p.numel() for p in model.parameters())
    result = {**job, "params_total": total}
    if job["method"] == "original":
        result["details"], result["seconds"], result["cpu_seconds"], result["peak_mb"] = {}, 0.0, 0.0, 0.0
        if cuda:
            result["cpu_seconds"], result["gpu_peak_mb"] = None, 0.0
    else:
        budget = job["layers"] * layer_params
        sampler = Peak()
        sampler.start()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            gpu_base = torch.cuda.memory_allocated(device)
        start, cpu_start = placement.clock(), time.process_time()
        if job["method"] == "shortgpt":
            details = shortgpt(model, calibration, job["layers"])
        elif job["method"] == "replaceme":
            details = replaceme(model, calibration, job["layers"])
        else:
            units = "mlp" if job["method"] == "planner-mlp" else "mlp,layer,span"
            plan = hlc.plan_collapse(model, calibration, num_params=budget, units=units, show_progress=False)
            hlc.collapse_model(model, plan=plan)
            details = {"selected": [(b.name, b.method) for b in plan.selected], "alternatives": plan.alternatives}
        result["seconds"] = placement.clock() - start
        result["cpu_seconds"] = None if cuda else time.process_time() - cpu_start  # CPU time misses the GPU's work
        sampler.running = False
        sampler.join()
        result["peak_mb"] = (max(sampler.peak, _rss()) - sampler.base) / 2**20
        if cuda:
            result["gpu_peak_mb"] = (torch.cuda.max_memory_allocated(device) - gpu_base) / 2**20
        result["details"] = details
    result["params_removed"] = total - sum(p.numel() for p in model.parameters())
    result["layers_left"] = model.config.num_hidden_layers
    for domain, ids in held_out.items():
        loss = 0.0
        with torch.no_grad():
            for batch in batches(ids):
                loss += float(model(**batch, labels=batch["input_ids"]).loss) * batch["input_ids"].numel()
        result[f"ppl_{domain}"] = math.exp(loss / ids.numel())
    return result


# ------------------------------------------------------------------------------------------------------ the grid
def jobs(args) -> list[dict]:
    base = {"threads": args.threads, "eval_windows": args.eval_windows, "device": args.device, "dtype": args.dtype}
    if args.quick:
        return [{**base, "method": m, "calibration": "shakespeare", "windows": 8, "layers": 1, "eval_windows": 4,
                 "tiny": args.tiny} for m in ("original", "shortgpt", "replaceme", "planner")]
    found = [{**base, "method": "original", "calibration": "shakespeare", "windows": 16, "layers": 0}]
    if args.sweep:
        for windows_ in (16, 64, 256):
            found += [{**base, "method": m, "calibration": "shakespeare", "windows": windows_, "layers": 4}
                      for m in ("shortgpt", "replaceme", "planner")]
        return found
    for domain in args.calibrations:
        for layers in args.budgets:
            for method in args.methods:
                if method == "planner-mlp" and layers != 4:
                    continue  # the measured planner: one budget, 4k tokens (one evaluation per candidate merge)
                windows_ = 16 if method == "planner-mlp" else args.windows
                found.append({**base, "method": method, "calibration": domain, "windows": windows_,
                              "layers": layers})
    return found


def tiny_model(folder: Path) -> str:
    """A small Llama (4 layers, d = 64) with SmolLM2's tokenizer, for --quick."""
    import torch
    from common import assets
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                                  max_position_embeddings=512, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run(job: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"job {job} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict], name: str, command_args: argparse.Namespace) -> None:
    original = next(r for r in rows if r["method"] == "original")
    table = []
    for r in rows:
        if r["method"] == "original":
            continue
        cells = {"calibration": f"{r['calibration']} {r['windows'] * WINDOW // 1024}k", "budget (layers)": r["layers"],
                 "method": r["method"], "params removed": f"{100 * r['params_removed'] / r['params_total']:.1f}%",
                 "layers": r["layers_left"], "seconds": f"{r['seconds']:.0f}",
                 "CPU seconds": "–" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.0f}",
                 "peak MB": f"{r['peak_mb']:.0f}"}
        if "gpu_peak_mb" in r:
            cells["GPU peak MB"] = f"{r['gpu_peak_mb']:.0f}"
        for domain in DOMAINS:
            ppl, base = r[f"ppl_{domain}"], original[f"ppl_{domain}"]
            cells[f"ppl {domain}"] = f"{ppl:.2f} ({100 * (ppl / base - 1):+.1f}%)"
        table.append(cells)
    columns = ["calibration", "budget (layers)", "method", "params removed", "layers", *(f"ppl {d}" for d in DOMAINS),
               "seconds", "CPU seconds", "peak MB", *(["GPU peak MB"] if "gpu_peak_mb" in original else [])]
    text = markdown_table(table, columns)
    print(text)
    env = environment()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    where = describe(command_args.device, command_args.dtype, env.get("gpu"), weights=True)
    head = (f"# Decoder compression without training (SmolLM2-135M)\n\nCommand: `{env['command']}` on "
            f"{env['machine']} ({env['cpus']} CPUs, {command_args.threads} torch thread per job, {where}, torch "
            f"{env['torch']}, transformers {env['transformers']}).\n\nOriginal model: perplexity "
            f"{original['ppl_shakespeare']:.2f} (held-out Shakespeare), {original['ppl_python']:.2f} (held-out Python "
            f"documentation); {original['eval_windows']} × {WINDOW} held-out tokens per text. Cells: perplexity "
            "(change vs the original model)." + (" Peak MB: resident-set growth; GPU peak MB: peak CUDA memory "
                                                "allocated during the method." if "gpu_peak_mb" in original else "")
            + "\n\n")
    (RESULTS / f"{name}.md").write_text(head + text + f"\n\n![perplexity against parameters removed]({name}.png)\n")
    if not command_args.quick:
        fig, axes = new_plot()
        for method in sorted({r["method"] for r in rows} - {"original"}):
            for domain, style in zip(DOMAINS, ("-", "--")):
                points = sorted((r["params_removed"] / r["params_total"], r[f"ppl_{domain}"]) for r in rows
                                if r["method"] == method and r["calibration"] == "shakespeare")
                if points:
                    axes.plot(*zip(*points), style, marker="o", label=f"{method}, {domain}")
        axes.set_xlabel("fraction of parameters removed (calibrated on Shakespeare)")
        axes.set_ylabel("held-out perplexity")
        axes.set_yscale("log")
        save_plot(fig, axes, "SmolLM2-135M without training", RESULTS / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="one tiny job per method (CI smoke run)")
    parser.add_argument("--tiny", default=None, help=argparse.SUPPRESS)  # --quick: a tiny model folder
    parser.add_argument("--sweep", action="store_true", help="calibration sizes 4k, 16k, 64k at a 4-layer budget")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGET_LAYERS), help="budgets in layers")
    parser.add_argument("--calibrations", nargs="+", default=list(DOMAINS), choices=DOMAINS,
                        help="the texts to calibrate on (each method is measured on both)")
    parser.add_argument("--windows", type=int, default=64, help="calibration windows of 256 tokens (default 16k)")
    parser.add_argument("--eval_windows", type=int, default=EVAL_WINDOWS,
                        help=f"held-out windows of 256 tokens per text (default {EVAL_WINDOWS}: 8k tokens)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per job (default 1 on the CPU, all on CUDA)")
    parser.add_argument("--name", default=None)
    add_device_arguments(parser, "the model's weights and forward passes: float32, bfloat16 (cpu or cuda), float16 "
                                 "(cuda)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    placement = configure(parser, args, training=False)
    print(f"device: {placement.label(weights=True)}", flush=True)
    name = args.name or ("decoder_compression_quick" if args.quick else
                         "decoder_compression_sweep" if args.sweep else "decoder_compression")
    rows = []
    if args.quick and args.tiny is None:
        import tempfile

        args.tiny = tiny_model(Path(tempfile.mkdtemp(prefix="decoder_compression_")))
    failed = []
    for job in jobs(args):
        try:
            rows.append(run(job))
        except RuntimeError as error:  # one method failing leaves the others' jobs to run; the original model cannot
            if job["method"] == "original":
                raise
            print(error, file=sys.stderr, flush=True)
            failed.append({k: job[k] for k in ("method", "calibration", "windows", "layers")})
            continue
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "details"}), flush=True)
        report(rows, name, args)  # partial results are kept as they come
    if args.quick:
        Path(RESULTS / f"{name}.md").unlink(missing_ok=True)
        Path(RESULTS / f"{name}.json").unlink(missing_ok=True)
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed (their errors above; the results hold the others): {failed}")


if __name__ == "__main__":
    main()
