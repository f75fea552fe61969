"""The benchmark scripts still run (their quick modes; the numbers of a quick run are not results)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.parametrize("script, options, expected", [
    ("speed.py", [], "collapsed all 6"),
    ("trainer_overhead.py", [], "ratio: trainer overhead"),
    ("load_memory.py", [], "load collapsed last 6"),
    ("quality.py", [], "planner (data-aware)"),
    ("quality.py", ["--methods", "blend", "--linear_target", "affine", "--refit_targets"],
     "layercollapse-blend-affine-refit"),
    ("gated_perplexity.py", ["--trainable", "mlps"], "cost of merging after plain fine-tuning"),
    ("generation.py", [], "LayerCollapse (progressive)"),
])
def test_benchmark_quick_mode(script, options, expected):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", *options], capture_output=True,
                            text=True, timeout=600, cwd=BENCHMARKS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout


def test_quality_paired_comparison_against_the_best_baseline(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    quality = importlib.import_module("quality")
    rows = [{"method": m, "k": 1, "seed": s, "accuracy": a} for m, s, a in [
        ("plain fine-tuning", 0, 0.95), ("plain fine-tuning", 1, 0.95),  # the reference is not a baseline
        ("drop MLP", 0, 0.80), ("drop MLP", 1, 0.90),  # mean 0.85: the best baseline
        ("planner (data-aware)", 0, 0.84), ("planner (data-aware)", 1, 0.84),
        ("layercollapse-blend", 0, 0.82), ("layercollapse-blend", 1, 0.90),
    ]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    [line] = quality.paired_rows(rows, methods, [1])
    # differences +2 and 0 points: mean +1, standard deviation 1.414, standard error 1.0
    assert line == {"method": "layercollapse-blend", "k=1": "+1.00 ± 1.00 (drop MLP)"}
