"""The wheel carries what the installed library reads at run time (model card template, metric scripts)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_model_card_template_and_the_metrics(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("hf_layercollapse-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        template = archive.read("hf_layercollapse/model_cards/layercollapse.md")
    assert template == (ROOT / "model_cards" / "layercollapse.md").read_bytes()
    assert {"hf_layercollapse/metrics/accuracy.py", "hf_layercollapse/metrics/f1.py"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/", "examples/")) for name in names)
