"""Inference latency and throughput of a collapsed vs the original all-MiniLM-L6-v2, against the ideal ratio.

    python benchmarks/speed.py            # batch 1 and 32, sequence 128, 30 timed repetitions each
    python benchmarks/speed.py --quick    # CI smoke run (few repetitions; numbers are not results)
    python benchmarks/speed.py --device cuda --dtype bfloat16   # on a GPU: writes results/speed_cuda_bfloat16.*

Both models run side by side in one process, interleaved repetition by repetition (so load changes on the
machine hit both), after warm-up; the table reports medians. The ideal speed-up is the ratio of total
FLOPs per token (projections and attention scores) of the original and collapsed models.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import assets, write_results
from transformers import AutoModel

import hf_layercollapse as hlc


def flops_per_token(model, seq: int) -> int:
    """2 × multiply-adds per token of every Linear, plus attention scores and weighted sums."""
    linear = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    return linear + layers * 2 * 2 * seq * hidden


def collapsed_minilm(blocks: int):
    model = AutoModel.from_pretrained(assets.minilm_path()).eval()
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=list(range(-blocks, 0))))
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    hlc.collapse_model(model)  # merged in fp32; the variants are cast to --dtype afterwards
    return model


def timed(model, ids, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model(input_ids=ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    reps, warmup = (3, 1) if args.quick else (30, 5)
    original = AutoModel.from_pretrained(assets.minilm_path()).eval()
    variants = {"original": original, "collapsed last 3": collapsed_minilm(3), "collapsed all 6": collapsed_minilm(6)}
    variants = {name: model.to(device=device, dtype=dtype) for name, model in variants.items()}
    rows = []
    for batch in (1, 32):
        ids = torch.randint(1000, 20000, (batch, args.seq), device=device)
        times = {name: [] for name in variants}
        for rep in range(warmup + reps):
            for name, model in variants.items():
                elapsed = timed(model, ids, device)
                if rep >= warmup:
                    times[name].append(elapsed)
        base = statistics.median(times["original"])
        for name, model in variants.items():
            median = statistics.median(times[name])
            ideal = flops_per_token(original, args.seq) / flops_per_token(model, args.seq)
            speedup = base / median
            rows.append({"model": name, "device": args.device, "dtype": args.dtype, "batch": batch, "seq": args.seq,
                         "params": f"{sum(p.numel() for p in model.parameters()):,}",
                         "median latency (ms)": f"{1000 * median:.1f}",
                         "throughput (seq/s)": f"{batch / median:.1f}", "speed-up": f"{speedup:.3f}",
                         "ideal (FLOPs)": f"{ideal:.3f}",
                         "% of ideal gain": f"{100 * (speedup - 1) / (ideal - 1):.0f}" if ideal > 1 else "-"})
    if args.quick:
        print(rows)
        return
    name = "speed" if (args.device, args.dtype) == ("cpu", "float32") else f"speed_{device.type}_{args.dtype}"
    write_results(name, f"Inference speed: collapsed vs original all-MiniLM-L6-v2 ({args.device}, {args.dtype})",
                  rows, list(rows[0]), notes="`% of ideal gain` = (speed-up − 1) / (ideal − 1).")


if __name__ == "__main__":
    main()
