"""Shared helpers of the benchmark scripts: device and dtype options, environment record, result files, a Markdown
table."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# the offline assets live with the examples (they are not part of the installed library)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import offline_assets as assets  # noqa: E402

__all__ = ["DTYPES", "RESULTS", "Placement", "active_placement", "add_device_arguments", "assets", "configure",
           "describe", "environment", "resolve_placement", "without_autocast"]

DTYPES = ("float32", "bfloat16", "float16")


def describe(device: str, dtype: str, gpu: str | None = None, weights: bool = False) -> str:
    """``cpu, float32``; ``cuda:0 (NVIDIA H200), bfloat16 mixed precision (fp32 weights)`` for training, or
    ``..., bfloat16 weights`` where the model itself is cast (``weights``)."""
    where = f"{device} ({gpu})" if gpu else device
    if dtype == "float32":
        return f"{where}, float32"
    return f"{where}, {dtype} " + ("weights" if weights else "mixed precision (fp32 weights)")


@dataclass(frozen=True)
class Placement:
    """Where a benchmark runs (``--device``, ``--dtype``) and what follows from it for the scripts."""

    device: torch.device
    dtype: torch.dtype
    gpu: str | None = None  # the CUDA device's name

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def training_kwargs(self) -> dict:
        """``TrainingArguments`` keywords: the Trainer's device and its mixed precision (the weights stay fp32
        master copies; ``float32``: none)."""
        kwargs: dict = {"use_cpu": self.device.type == "cpu"}
        if self.dtype is torch.bfloat16:
            kwargs["bf16"] = True
        elif self.dtype is torch.float16:
            kwargs["fp16"] = True
        return kwargs

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of the scripts' own forward passes (evaluation): autocast to ``--dtype`` as the Trainer's
        mixed precision does; nothing for float32."""
        if self.dtype is torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def clock(self) -> float:
        """``time.perf_counter()`` once the device has finished its queued work (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def label(self, weights: bool = False) -> str:
        return describe(str(self.device), self.dtype_name, self.gpu, weights)

    def record(self) -> dict:
        return {"device": str(self.device), "dtype": self.dtype_name, **({"gpu": self.gpu} if self.gpu else {})}


CPU = Placement(torch.device("cpu"), torch.float32)
_active: Placement | None = None


def resolve_placement(device: str, dtype: str, training: bool = True) -> Placement:
    """The placement of ``--device DEVICE --dtype DTYPE``, or a ValueError naming the flag, the value and the fix.

    ``cpu`` takes float32 or bfloat16 (CPU autocast); ``cuda`` / ``cuda:N`` any of :data:`DTYPES`. ``training``: the
    Trainer trains on the first visible GPU (and on all of them, DataParallel, when several are visible), so a
    training benchmark takes exactly one visible GPU, chosen with ``CUDA_VISIBLE_DEVICES``."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}; use --dtype float32 or bfloat16")
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a device name; use --device cpu, cuda or cuda:N") from None
    if where.type == "cpu":
        if dtype == "float16":
            raise ValueError("--dtype float16 on --device cpu: float16 mixed precision needs CUDA; use --dtype "
                             "bfloat16 or float32 on the CPU, or --device cuda")
        return Placement(torch.device("cpu"), getattr(torch, dtype))
    if where.type != "cuda":
        raise ValueError(f"--device {device}: the benchmarks run on cpu or cuda; use --device cpu or --device cuda")
    if not torch.cuda.is_available():
        reason = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {device}: CUDA is not available here ({reason}, torch {torch.__version__}); use "
                         "--device cpu, or run on a machine with a GPU and a CUDA build of torch")
    count = torch.cuda.device_count()
    if where.index is not None and where.index >= count:
        raise ValueError(f"--device {device}: {count} CUDA device(s) visible; use --device cuda:0 … "
                         f"cuda:{count - 1}")
    if training and count > 1:
        raise ValueError(f"--device {device}: the Trainer trains on the first visible GPU and spreads over all {count} "
                         "visible ones; show it one, e.g. CUDA_VISIBLE_DEVICES=N with --device cuda")
    gpu = torch.cuda.get_device_name(where)
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bfloat16: {gpu} has no bfloat16 support; use --dtype float16 or float32")
    return Placement(where, getattr(torch, dtype), gpu)


def add_device_arguments(parser: argparse.ArgumentParser,
                         dtype_help: str = "float32, or the mixed precision of training and evaluation (weights stay "
                                           "fp32): bfloat16 (cpu or cuda), float16 (cuda)") -> None:
    """``--device`` (default cpu) and ``--dtype`` (default float32); :func:`configure` checks them."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help=dtype_help)


def configure(parser: argparse.ArgumentParser, args: argparse.Namespace, training: bool = True) -> Placement:
    """Check ``--device`` / ``--dtype`` (a clear parser error otherwise), make the placement the active one (recorded
    by :func:`environment`) and resolve ``args.threads`` when it is None: 1 on the CPU (leaves a core to other
    work), torch's default (every core) when the work runs on the GPU."""
    global _active
    try:
        placement = resolve_placement(args.device, args.dtype, training)
    except ValueError as error:
        parser.error(str(error))
    if placement.device.type == "cuda" and placement.device.index is not None:
        torch.cuda.set_device(placement.device)
    if getattr(args, "threads", 0) is None:
        args.threads = 1 if placement.device.type == "cpu" else torch.get_num_threads()
    _active = placement
    return placement


def active_placement() -> Placement:
    """The placement :func:`configure` set (cpu, float32 before it is called)."""
    return _active or CPU


def without_autocast(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, in place, without the autocast wrapper that the Trainer's mixed precision (accelerate) puts on its
    ``forward``: the wrapper stays after training and on deep copies, and the library's calibration statistics and
    merge checks are meant to see the model's own dtype. The scripts' evaluations take their autocast from
    :meth:`Placement.autocast`. Nothing changes for a model the Trainer did not wrap (float32)."""
    if "_original_forward" in vars(model):
        from accelerate.utils import extract_model_from_parallel

        extract_model_from_parallel(model, keep_fp32_wrapper=False)
    return model


def environment() -> dict:
    import transformers

    return {"command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            **(_active.record() if _active else {})}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, rows: list[dict], columns: list[str], notes: str = "") -> str:
    """Print the table and write results/NAME.json and results/NAME.md; returns the table."""
    env = environment()
    table = markdown_table(rows, columns)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    where = f", {_active.label()}" if _active else ""
    (RESULTS / f"{name}.md").write_text(
        f"# {title}\n\nCommand: `{env['command']}` on {env['machine']} ({env['cpus']} CPUs{where}, torch "
        f"{env['torch']}, transformers {env['transformers']}).\n\n{table}\n\n{notes}\n")
    return table


def new_plot():
    """A figure and axes for a results plot (headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def save_plot(fig, ax, title: str, path, legend_size: int = 8, grid: str = "major") -> None:
    """Title, grid and legend, then write the PNG."""
    ax.set_title(title)
    ax.grid(alpha=0.3, which=grid)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
