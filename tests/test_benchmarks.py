"""The benchmark scripts still run (their quick modes; the numbers of a quick run are not results)."""

from __future__ import annotations

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
    ("gated_perplexity.py", [], "collapse cost after training"),
    ("generation.py", [], "LayerCollapse (progressive)"),
])
def test_benchmark_quick_mode(script, options, expected):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", *options], capture_output=True,
                            text=True, timeout=600, cwd=BENCHMARKS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
