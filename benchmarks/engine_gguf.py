"""A stock compressed checkpoint in a second engine: SmolLM2-135M cut by 4 layers, converted to GGUF, run in llama.cpp.

A plan made only of layer and span removals (each replaced by a map fused into the ``down_proj`` of the layer before
it) saves as the stock architecture: a plain Llama checkpoint with fewer ``num_hidden_layers``. This script shows it
end to end on the real SmolLM2-135M (offline):

1. cut ``--layers`` layers training-free, calibrated on Shakespeare (``--method replaceme``: the span of lowest
   input/output cosine distance and its least-squares map, as ``decoder_compression.py`` does it with the library's
   ``ResidualFitStats`` and ``cut_layers``; ``--method planner``: ``plan_collapse(units="layer,span")``);
2. ``save_pretrained`` (with the tokenizer), then load it in a fresh process that never imports this library (plain
   ``transformers.AutoModelForCausalLM``): no missing or unexpected weights, no config fields beyond the original's,
   the same logits as the model in memory;
3. convert the original and the compressed checkpoint to GGUF (``--outtype``, default f32) with llama.cpp's own
   ``convert_hf_to_gguf.py`` (the one vendored in the llama-cpp-python sdist: ``--convert-script``, or found / fetched
   with ``pip download``, see :func:`find_convert_script`);
4. run both GGUF files in llama.cpp (``llama_cpp.Llama``, ``--threads`` threads, KV cache in f32) and compare with
   transformers on the same token ids: next-token logits over a held-out Shakespeare window (max abs difference,
   relative to the largest logit, top-1 agreement), perplexity on held-out windows, greedy generation of
   ``--new-tokens`` tokens from three prompts (equal, or the first divergence) and decode speed. The original model's
   row is the reference for what "matching" means between the two engines; ``HF float64`` gives the float32
   rounding noise of transformers itself.

    pip install -e ".[engines]"        # compiles llama.cpp (10-25 min on one core)
    python benchmarks/engine_gguf.py   # ~5 minutes on one CPU thread
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCHMARKS = Path(__file__).resolve().parent
PROMPTS = ("ROMEO. But soft, what light through yonder window breaks?",
           "The capital of France is",
           "def fibonacci(n):\n    ")
CONVERT = "convert_hf_to_gguf.py"
#: the files a stock checkpoint folder may hold (anything else would be this library's)
STOCK_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"}
#: config values that may change between the original and the cut checkpoint
CHANGED_BY_A_CUT = {"num_hidden_layers", "layer_types", "transformers_version", "dtype", "torch_dtype"}


# ------------------------------------------------------------------------------------------------------ GGUF
def _cache_dir() -> Path:
    return Path(os.environ.get("HF_LAYERCOLLAPSE_CACHE", Path.home() / ".cache" / "hf_layercollapse"))


def _script_in(folder: Path) -> Path | None:
    for candidate in (folder / CONVERT, folder / "vendor" / "llama.cpp" / CONVERT):
        if candidate.is_file():
            return candidate
    return None


def _extract_converter(sdist: Path, target: Path) -> Path:
    """Extract ``vendor/llama.cpp``'s converter (the script, its ``conversion`` package and ``gguf-py``, the
    ``gguf`` it was written against) from a llama-cpp-python sdist into ``target``."""
    wanted = ("conversion/", "gguf-py/", "models/templates/")  # and the script itself (not the 75 MB of models/)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            inner = parts[1] if len(parts) == 2 else ""
            if not inner.startswith("vendor/llama.cpp/"):
                continue
            rest = inner.removeprefix("vendor/llama.cpp/")
            if (rest == CONVERT or rest.startswith(wanted)) and (member.isfile() or member.isdir()):
                member.name = rest
                members.append(member)
        if not any(m.name == CONVERT for m in members):
            shutil.rmtree(tmp)
            raise FileNotFoundError(f"{sdist} has no vendor/llama.cpp/{CONVERT}")
        tar.extractall(tmp, members=members, filter="data")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target / CONVERT


def find_convert_script(explicit: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` that matches the installed llama-cpp-python.

    In order: ``explicit`` (the script, a llama.cpp checkout, or a llama-cpp-python sdist ``.tar.gz``), the
    ``LLAMA_CPP_CONVERT_SCRIPT`` environment variable (the same), a source checkout of llama-cpp-python next to the
    imported package, the cache (``~/.cache/hf_layercollapse/llama_cpp_python-VERSION``), and (``fetch``) the sdist
    of the installed version, fetched with ``pip download --no-deps --no-binary :all: llama-cpp-python==VERSION``
    (76 MB; the wheel does not ship the script) and extracted into the cache."""
    given = explicit or os.environ.get("LLAMA_CPP_CONVERT_SCRIPT")
    if given:
        path = Path(given).expanduser()
        if path.is_file() and path.name.endswith(".tar.gz"):  # an sdist: extracted once into the cache
            target = _cache_dir() / path.name.removesuffix(".tar.gz")
            target.parent.mkdir(parents=True, exist_ok=True)
            return _script_in(target) or _extract_converter(path, target)
        found = path if path.is_file() else _script_in(path)
        if found is None:
            raise FileNotFoundError(f"{given}: not {CONVERT}, a folder holding it, or a llama-cpp-python sdist")
        return found
    import llama_cpp

    version = importlib.metadata.version("llama-cpp-python")
    cache = _cache_dir() / f"llama_cpp_python-{version}"
    checkout = _script_in(Path(llama_cpp.__file__).resolve().parents[1])
    if checkout is not None:
        return checkout
    cached = _script_in(cache)
    if cached is not None:
        return cached
    if not fetch:
        raise FileNotFoundError(f"no {CONVERT} for llama-cpp-python {version} in {cache}: set "
                                "LLAMA_CPP_CONVERT_SCRIPT (or pass --convert-script) to it or to the sdist, or run "
                                "benchmarks/engine_gguf.py once (it fetches the sdist)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        print(f"fetching the llama-cpp-python {version} sdist for {CONVERT} (pip download)", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "--dest", download, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        sdists = sorted(Path(download).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise FileNotFoundError(f"pip download of the llama-cpp-python {version} sdist failed "
                                    f"({done.stderr[-800:]}); pass --convert-script PATH ({CONVERT} or the sdist)")
        return _extract_converter(sdists[0], cache)


def convert_to_gguf(folder: str | os.PathLike, outfile: str | os.PathLike, outtype: str = "f32",
                    script: str | os.PathLike | None = None) -> Path:
    """``python convert_hf_to_gguf.py FOLDER --outfile OUTFILE --outtype OUTTYPE`` (offline); the GGUF path, or a
    RuntimeError with the converter's last output."""
    script = find_convert_script(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the script uses its own gguf-py, the version it was written against
    command = [sys.executable, str(script), str(folder), "--outfile", str(outfile), "--outtype", outtype]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not Path(outfile).is_file():
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return Path(outfile)


def gguf_fields(path: str | os.PathLike) -> dict:
    """The architecture, block count and tensor count of a GGUF file (read with the ``gguf`` package)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    return {"architecture": arch, "block_count": int(reader.fields[f"{arch}.block_count"].contents()),
            "tensors": len(reader.tensors), "file_type": int(reader.fields["general.file_type"].contents())}


def open_llama(path: str | os.PathLike, threads: int = 1, n_ctx: int = 512, logits_all: bool = True):
    """A llama.cpp model on the CPU with its KV cache in f32 (the default f16 cache would add its own rounding)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, seed=0, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(ids), vocab]`` for every position of ``ids`` (one fresh sequence)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


def compare_logits(reference: np.ndarray, other: np.ndarray) -> dict:
    """Max abs difference, that relative to the largest reference logit, and top-1 agreement over positions."""
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    scale = float(np.abs(reference).max())
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max()) / scale, "logit_scale": scale,
            "top1_agree": float((reference.argmax(-1) == other.argmax(-1)).mean())}


def nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """The summed next-token negative log-likelihood of ``ids`` under ``logits`` (float64) and its token count."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    log_probs = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


@torch.no_grad()
def greedy_hf(model, ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy decoding with its KV cache (argmax each step), ``new_tokens`` tokens: EOS does not stop
    it, as in :func:`greedy_llama` (``generate`` would stop there)."""
    # the cache argument: ``cache`` in recent transformers 5, ``past_key_values`` before
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    start = time.perf_counter()
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < new_tokens:
        past = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{name: past})
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, time.perf_counter() - start


def greedy_llama(llm, ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    """llama.cpp's own greedy sampler (``temp=0``, no repeat penalty), ``new_tokens`` tokens (EOS does not stop it)."""
    llm.reset()
    tokens, start = [], time.perf_counter()
    for token in llm.generate(list(ids), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            break
    return tokens, time.perf_counter() - start


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ------------------------------------------------------------------------------------------------------ stock check
PLAIN_LOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
folder, ids = sys.argv[1], json.loads(sys.argv[2])
model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
with torch.no_grad():
    logits = model.eval()(torch.tensor([ids])).logits[0]
print(json.dumps({"class": type(model).__name__, "num_hidden_layers": model.config.num_hidden_layers,
                  "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                  "mismatched": [list(map(str, m)) for m in info.get("mismatched_keys", [])],
                  "library_imported": any(m.split(".")[0] == "hf_layercollapse" for m in sys.modules),
                  "logits": logits.tolist()}))
"""


def check_stock(folder: Path, original_config: dict, ids: list[int], expected: np.ndarray) -> dict:
    """Load ``folder`` in a fresh process that does not import this library and check that it is a stock
    checkpoint: no missing/unexpected weights, config keys a subset of the original's (only the layer count and
    bookkeeping values changed), only standard files, the same logits as ``expected``."""
    config = json.loads((folder / "config.json").read_text())
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), json.dumps(ids)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"plain transformers could not load {folder}:\n{done.stderr[-3000:]}")
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    extra_keys = sorted(set(config) - set(original_config))
    changed = sorted(k for k in config if k in original_config and config[k] != original_config[k])
    extra_files = sorted(p.name for p in folder.iterdir() if p.name not in STOCK_FILES)
    result = {"class": loaded["class"], "num_hidden_layers": loaded["num_hidden_layers"],
              "original_layers": original_config["num_hidden_layers"], "extra_config_keys": extra_keys,
              "changed_config_keys": changed, "extra_files": extra_files, "missing_weights": loaded["missing"],
              "unexpected_weights": loaded["unexpected"], "mismatched_weights": loaded["mismatched"],
              "library_imported": loaded["library_imported"],
              "max_abs_vs_memory": float(np.abs(np.array(loaded["logits"]) - expected).max())}
    problems = [name for name, bad in (
        ("fewer layers", not result["num_hidden_layers"] < result["original_layers"]),
        ("no extra config keys", bool(extra_keys)), ("only layer count changed", set(changed) - CHANGED_BY_A_CUT),
        ("standard files", bool(extra_files)), ("no missing weights", bool(loaded["missing"])),
        ("no unexpected weights", bool(loaded["unexpected"])), ("no mismatched weights", bool(loaded["mismatched"])),
        ("plain transformers", loaded["library_imported"]),
        ("same logits", result["max_abs_vs_memory"] > 1e-5)) if bad]
    result["stock"] = not problems
    result["failed_checks"] = problems
    return result


# ------------------------------------------------------------------------------------------------------ compress
def compress(model, calibration: list[dict], layers: int, method: str) -> dict:
    """Cut ``layers`` layers of ``model`` in place, training-free; returns what was removed."""
    import hf_layercollapse as hlc

    if method == "replaceme":
        from decoder_compression import replaceme

        return {"method": "replaceme (span + least-squares map fused into down_proj)",
                **replaceme(model, calibration, layers)}
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    plan = hlc.plan_collapse(model, calibration, num_params=layers * layer_params, units="layer,span",
                             show_progress=False)
    hlc.collapse_model(model, plan=plan)
    return {"method": 'plan_collapse(units="layer,span")', "selected": [(b.name, b.method) for b in plan.selected]}


# ------------------------------------------------------------------------------------------------------ main
def measure(name: str, hf_model, gguf: Path, window: list[int], held_out: list[list[int]], prompts: list[list[int]],
            args, tokenizer) -> dict:
    """Every comparison of one model between transformers (``hf_model``) and llama.cpp (``gguf``)."""
    llm = open_llama(gguf, threads=args.threads, n_ctx=512)
    hf, cpp = hf_logits(hf_model, window), llama_logits(llm, window)
    row: dict = {"model": name, "layers": hf_model.config.num_hidden_layers,
                 "params": sum(p.numel() for p in hf_model.parameters()), "gguf": gguf_fields(gguf),
                 "gguf_mb": gguf.stat().st_size / 2**20, "logits": compare_logits(hf, cpp)}
    with torch.no_grad():
        fp64 = hf_model.double()(torch.tensor([window])).logits[0].numpy()
        hf_model.float()
    row["hf_fp64_vs_fp32"] = compare_logits(fp64, hf)
    row["cpp_vs_hf_fp64"] = compare_logits(fp64, cpp)
    totals = {"hf": [0.0, 0], "cpp": [0.0, 0]}
    for ids in held_out:
        for engine, logits in (("hf", hf_logits(hf_model, ids)), ("cpp", llama_logits(llm, ids))):
            loss, count = nll(logits, ids)
            totals[engine][0] += loss
            totals[engine][1] += count
    row["ppl_hf"], row["ppl_cpp"] = (math.exp(t[0] / t[1]) for t in totals.values())
    row["generations"] = []
    for text, ids in zip(PROMPTS, prompts):
        a, _ = greedy_hf(hf_model, ids, args.new_tokens)
        b, _ = greedy_llama(llm, ids, args.new_tokens)
        at = first_divergence(a, b)
        gen = {"prompt": text, "hf": a, "cpp": b, "first_divergence": at, "hf_text": tokenizer.decode(a),
               "cpp_text": tokenizer.decode(b),
               "cpp_tokenizer_agrees": llm.tokenize(text.encode(), add_bos=False, special=False) == ids}
        if at is not None:  # how close the two choices were in transformers: a near tie flips on rounding
            step = hf_logits(hf_model, ids + a[:at])[-1]
            gen["hf_margin_at_divergence"] = float(step[a[at]] - step[b[at]])
        row["generations"].append(gen)
    return row


def speed(models: list[tuple[object, Path]], prompt: list[int], args) -> list[dict]:
    """Decode speed of each (transformers model, GGUF) pair: ``prompt`` plus ``--speed-tokens`` greedy tokens, the
    models interleaved run by run, best of ``--repeats``; llama.cpp without ``logits_all`` (as it would serve)."""
    engines = [(hf, open_llama(gguf, threads=args.threads, n_ctx=512, logits_all=False)) for hf, gguf in models]
    times = [{"cpp": [], "hf": []} for _ in engines]
    for _ in range(args.repeats):
        for (hf, llm), spent in zip(engines, times):
            spent["cpp"].append(greedy_llama(llm, prompt, args.speed_tokens)[1])
            spent["hf"].append(greedy_hf(hf, prompt, args.speed_tokens)[1])
    return [{"cpp_tok_s": args.speed_tokens / min(t["cpp"]), "hf_tok_s": args.speed_tokens / min(t["hf"]),
             "cpp_seconds": t["cpp"], "hf_seconds": t["hf"]} for t in times]


def report(rows: list[dict], stock: dict, details: dict, args, seconds: dict, prompts_ids: list[list[int]]) -> None:
    import llama_cpp
    from common import RESULTS, environment, markdown_table

    table = []
    for r in rows:
        gens = r["generations"]
        equal = sum(g["first_divergence"] is None for g in gens)
        diverged = [f"{g['first_divergence']}, HF margin {g['hf_margin_at_divergence']:.2g}" for g in gens
                    if g["first_divergence"] is not None]
        table.append({
            "model": r["model"], "layers": r["layers"], "params": f"{r['params'] / 1e6:.1f}M",
            "GGUF": f"{r['gguf']['block_count']} blocks, {r['gguf_mb']:.0f} MB",
            "max abs Δ logits (rel.)": f"{r['logits']['max_abs']:.2e} ({r['logits']['max_rel']:.1e})",
            "top-1 agree": f"{100 * r['logits']['top1_agree']:.1f}%",
            "HF fp32 vs fp64 max abs Δ": f"{r['hf_fp64_vs_fp32']['max_abs']:.2e}",
            "ppl HF / llama.cpp": f"{r['ppl_hf']:.3f} / {r['ppl_cpp']:.3f}",
            f"greedy {args.new_tokens} tokens equal": f"{equal}/{len(gens)}"
                                                      + (f" (diverge at {', '.join(diverged)})" if diverged else ""),
            "llama.cpp tok/s": f"{r['cpp_tok_s']:.1f}", "HF tok/s": f"{r['hf_tok_s']:.1f}"})
    columns = list(table[0])
    text = markdown_table(table, columns)
    print(text)
    env = environment()
    env.update({"llama_cpp_python": llama_cpp.__version__, "gguf": importlib.metadata.version("gguf"),
                "convert_script": str(args.convert_script_path), "threads": args.threads})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"environment": env, "compression": details,
                                                            "stock_check": stock, "seconds": seconds, "rows": rows},
                                                           indent=2) + "\n")
    checks = ("fewer layers, no extra config keys, only the layer count changed, standard files only, no missing / "
              "unexpected weights, logits equal to the model in memory" if stock["stock"]
              else f"FAILED: {', '.join(stock['failed_checks'])}")
    samples = []
    for r in rows:
        for g in r["generations"]:
            same = "identical" if g["first_divergence"] is None else f"diverge at token {g['first_divergence']}"
            samples.append(f"| {r['model']} | `{g['prompt']!r}` | `{g['hf_text']!r}` | `{g['cpp_text']!r}` | {same} |")
    head = (f"# A stock compressed checkpoint in llama.cpp (SmolLM2-135M → GGUF)\n\nCommand: `{env['command']}` on "
            f"{env['machine']} ({env['cpus']} CPUs, {args.threads} thread(s) for both engines, torch {env['torch']}, "
            f"transformers {env['transformers']}, llama-cpp-python {env['llama_cpp_python']}, gguf "
            f"{env['gguf']}).\n\n"
            f"Compression: {details['method']}, {details.get('span', details.get('selected'))}; "
            f"{args.windows} × 256 Shakespeare calibration tokens; {seconds['compress']:.0f} s. Saved with "
            f"`save_pretrained`, it is a stock `{stock['class']}` checkpoint of {stock['num_hidden_layers']} layers "
            f"(was {stock['original_layers']}): a fresh process that never imports `hf_layercollapse` loads it with "
            f"`AutoModelForCausalLM.from_pretrained` ({checks}; changed config keys: "
            f"{', '.join(stock['changed_config_keys'])}).\n\n"
            f"Both checkpoints were converted with llama.cpp's `{CONVERT}` (vendored in the llama-cpp-python sdist) "
            f"to GGUF {args.outtype} and run by `llama_cpp.Llama` (CPU, KV cache f32). Both engines get the same token "
            f"ids. Logits: every position of one held-out Shakespeare window of {args.window} tokens (rel. = max abs "
            f"Δ ÷ the largest |logit|); HF fp32 vs fp64: transformers' own float32 rounding on that window, the "
            f"scale of an engine difference that means nothing. Perplexity: {args.eval_windows} held-out windows of "
            f"256 tokens, computed from each engine's logits. Greedy: {args.new_tokens} new tokens from each of "
            f"{len(PROMPTS)} prompts (transformers: argmax with its KV cache; llama.cpp: its greedy sampler; EOS "
            f"stops neither). Speed: tokens per second for the first prompt ({len(prompts_ids[0])} tokens) plus "
            f"{args.speed_tokens} new tokens, best of {args.repeats} runs interleaved between the models, "
            f"{args.threads} thread(s) (llama.cpp without `logits_all`; transformers float32 with its KV cache)."
            "\n\n")
    (RESULTS / f"{args.name}.md").write_text(
        head + text + "\n\nGenerated text (greedy):\n\n| model | prompt | transformers | llama.cpp | tokens |\n"
        "|---|---|---|---|---|\n" + "\n".join(samples) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="layers to remove (default 4)")
    parser.add_argument("--method", choices=("replaceme", "planner"), default="replaceme")
    parser.add_argument("--windows", type=int, default=16, help="calibration windows of 256 tokens (default 16)")
    parser.add_argument("--eval-windows", type=int, default=4, help="held-out windows for perplexity (default 4)")
    parser.add_argument("--window", type=int, default=128, help="tokens of the logit-comparison window")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    parser.add_argument("--speed-tokens", type=int, default=64, help="new tokens of the speed run (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads of both engines (default 1)")
    parser.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16"))
    parser.add_argument("--convert-script", default=None,
                        help=f"{CONVERT}, a llama.cpp folder or a llama-cpp-python sdist (default: found or fetched)")
    parser.add_argument("--work", default=None,
                        help="keep the checkpoints and GGUF files in this folder (default: a temporary one, removed)")
    parser.add_argument("--name", default="engine_gguf")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(BENCHMARKS))
    from common import assets
    from decoder_compression import batches, windows
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    args.convert_script_path = find_convert_script(args.convert_script)
    print(f"converter: {args.convert_script_path}", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="engine_gguf_"))
    work.mkdir(parents=True, exist_ok=True)
    original_dir = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    plays = assets.load_shakespeare()
    train, held = list(plays["train"]["text"]), list(plays["validation"]["text"])
    calibration = batches(windows(tokenizer, train, args.windows, seed=1))
    evaluation = windows(tokenizer, held, args.eval_windows + 1, seed=2).tolist()
    window, held_out = evaluation[0][:args.window], evaluation[1:]
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    seconds: dict = {}

    model = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
    start = time.perf_counter()
    details = compress(model, calibration, args.layers, args.method)
    seconds["compress"] = time.perf_counter() - start
    print(f"compressed: {details} in {seconds['compress']:.0f} s", flush=True)
    compressed_dir = work / "smollm2-cut"
    model.save_pretrained(compressed_dir)
    tokenizer.save_pretrained(compressed_dir)
    stock = check_stock(compressed_dir, json.loads((original_dir / "config.json").read_text()), window,
                        hf_logits(model, window))
    print(f"stock check: {stock}", flush=True)
    del model

    rows, models = [], []
    for name, folder in (("original", original_dir), (f"cut {args.layers} layers", compressed_dir)):
        start = time.perf_counter()
        gguf = convert_to_gguf(folder, work / f"{folder.name}-{args.outtype}.gguf", args.outtype,
                               args.convert_script_path)
        seconds[f"convert {name}"] = time.perf_counter() - start
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        rows.append(measure(name, hf_model, gguf, window, held_out, prompts, args, tokenizer))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "generations"}), flush=True)
        models.append((hf_model, gguf))
    for row, measured in zip(rows, speed(models, prompts[0], args)):
        row.update(measured)
    report(rows, stock, details, args, seconds, prompts)
    del models, rows
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)  # ~1.5 GB of checkpoints and GGUF files
    if not stock["stock"]:
        raise SystemExit(f"the compressed checkpoint is not stock: {stock['failed_checks']}")


if __name__ == "__main__":
    main()
