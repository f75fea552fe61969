"""The wheel carries what the installed library reads at run time (the model card template) and nothing of the demos."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_model_card_template_and_no_demo_infrastructure(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("hf_layercollapse", "model_cards"):
        shutil.copytree(ROOT / folder, source / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("hf_layercollapse-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        template = archive.read("hf_layercollapse/model_cards/layercollapse.md")
    assert template == (ROOT / "model_cards" / "layercollapse.md").read_bytes()
    assert {"hf_layercollapse/peft/config.py", "hf_layercollapse/targets/affine.py"} <= names  # the subpackages
    # demo and test infrastructure (offline assets, metric scripts) stays out of the installed library
    assert not any("metrics" in name or "assets" in name for name in names)
    assert not any(name.startswith(("tests/", "benchmarks/", "examples/")) for name in names)
