"""Peak memory of loading a collapsed checkpoint, and of collapse_model, on the real all-MiniLM-L6-v2.

    python benchmarks/load_memory.py            # full: collapses the last 3 and all 6 blocks
    python benchmarks/load_memory.py --quick    # CI smoke run (same measurements, fewer variants)

Each measurement runs in a fresh Python process that first imports torch, transformers and hf_layercollapse,
samples its resident set (``/proc/self/statm``) every millisecond while it loads the checkpoint (or collapses
the model): the reported number is the peak growth over the resident set before, next to the size of the weights
file. Loading builds the
collapsed structure directly (meta device), so its peak follows the collapsed weights, not the original ones.
Results go to benchmarks/results/load_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, sys, threading, time, torch, transformers
import hf_layercollapse as hlc
from transformers import AutoModel
transformers.utils.logging.disable_progress_bar()
mode, path = sys.argv[1], sys.argv[2]

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096

class Peak(threading.Thread):  # samples the resident set every millisecond
    def __init__(self):
        super().__init__(daemon=True); self.peak = self.base = rss(); self.running = True
    def run(self):
        while self.running:
            self.peak = max(self.peak, rss()); time.sleep(0.001)

if mode == "load":
    sampler = Peak(); sampler.start()
    model = AutoModel.from_pretrained(path)
    for param in model.parameters():  # weights may be memory-mapped: touch them so they count as resident
        param.data.sum()
else:
    model = AutoModel.from_pretrained(path)
    sampler = Peak(); sampler.start()
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=list(range(-int(mode[9:]), 0))))
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    hlc.collapse_model(model)
sampler.running = False; sampler.join()
peak = max(sampler.peak, rss())
print(json.dumps({"peak_growth": peak - sampler.base, "params": sum(p.numel() for p in model.parameters())}))
"""


def measure(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def save_collapsed(source: Path, blocks: int, target: Path) -> None:
    from transformers import AutoModel

    import hf_layercollapse as hlc

    model = AutoModel.from_pretrained(source)
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=list(range(-blocks, 0))))
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    hlc.collapse_model(model)
    model.save_pretrained(target)


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one collapsed variant only (CI smoke run)")
    args = parser.parse_args()
    from common import assets

    transformers.utils.logging.disable_progress_bar()
    source = assets.minilm_path()
    variants = [6] if args.quick else [3, 6]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"original": source}
        for k in variants:
            dirs[f"collapsed last {k}"] = Path(tmp) / f"collapsed{k}"
            save_collapsed(source, k, dirs[f"collapsed last {k}"])
        for name, path in dirs.items():
            weights = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
            result = measure("load", path)
            rows.append({"what": f"load {name}", "weights_bytes": weights, **result})
        for k in variants:
            result = measure(f"collapse_{k}", source)
            rows.append({"what": f"collapse_model (last {k}) on the loaded original", "weights_bytes": None, **result})
    header = "| measurement | weights file (MB) | peak RSS growth (MB) | parameters |\n|---|---|---|---|\n"
    lines = [f"| {r['what']} | {_mb(r['weights_bytes'])} | {_mb(r['peak_growth'])} | {r['params']:,} |" for r in rows]
    table = header + "\n".join(lines)
    print(table)
    meta = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "machine": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "quick": args.quick}
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "load_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (RESULTS / "load_memory.md").write_text(f"# Loading memory (all-MiniLM-L6-v2)\n\nCommand: `{meta['command']}`"
                                                f" on {meta['machine']}, torch {meta['torch']}, transformers "
                                                f"{meta['transformers']}.\n\n{table}\n")


if __name__ == "__main__":
    main()
