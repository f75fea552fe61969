"""Shared helpers of the benchmark scripts: environment record, result files, a Markdown table."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# the offline assets live with the examples (they are not part of the installed library)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import offline_assets as assets  # noqa: E402

__all__ = ["RESULTS", "assets", "environment"]


def environment() -> dict:
    import torch
    import transformers

    return {"command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}


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
    (RESULTS / f"{name}.md").write_text(
        f"# {title}\n\nCommand: `{env['command']}` on {env['machine']} ({env['cpus']} CPUs, torch "
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
