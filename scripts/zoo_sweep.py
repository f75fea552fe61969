"""Zoo sweep: every architecture that transformers knows, built tiny, through inject → α = 0 → α = 1 → collapse →
save → reload, in float64, each classified as

* ``exact``: injection at α = 0 leaves the outputs bit-for-bit close (≤ 1e-10), the collapsed model equals the
  α = 1 model (≤ 1e-8 relative) and so does its reloaded checkpoint;
* ``refused: ...`` / ``refused (merge check)``: the library said no, with a message (mixture of experts, shared
  activation, a merge its own check caught ...);
* ``no MLP``: no MLP block was found;
* ``wrong (injection | collapse | reload)``: an output changed silently;
* ``crash (...)``: an exception that is not a clear refusal (the innermost frame says where);
* ``timeout``: the per-model cap was hit;
* ``setup: ...``: the tiny model could not be built or run by this script (no verdict on the library).

Tiny models: every ``model_type`` of ``CONFIG_MAPPING_NAMES`` with its ``AutoModel`` class (else the first task head
that knows it); the default config shrunk generically (hidden sizes 32, 2 heads, 2 layers, FFN 37, vocabulary 99, images
64 px; lists of channels divided by 8; index lists remapped). Inputs: ``hf_layercollapse.units.tracing.dummy_inputs``,
else a variant built here (then given to ``get_collapse_model`` as ``example_inputs``).

Not a CI test: run it by hand, it takes tens of minutes over the whole zoo.

    python scripts/zoo_sweep.py                       # the whole zoo, results in benchmarks/results/zoo_sweep.*
    python scripts/zoo_sweep.py --only bert,llama     # a few architectures, printed (and written)
    python scripts/zoo_sweep.py --limit 20 --jobs 2   # the first 20, two worker processes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import logging
import math
import os
import platform
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PREFIX = "@@ZOO "

#: task heads tried, in order, for model types that have no AutoModel class (and for --heads)
HEAD_PRIORITY = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText",
                 "AutoModelForSequenceClassification", "AutoModelForImageClassification",
                 "AutoModelForSpeechSeq2Seq", "AutoModelForCTC")


# ------------------------------------------------------------------------------------------------ architectures
def auto_classes() -> list[str]:
    from transformers.models.auto import modeling_auto

    names = [n for n in dir(modeling_auto) if n.startswith("AutoModelFor")
             and hasattr(getattr(modeling_auto, n), "_model_mapping")]
    return ["AutoModel"] + [n for n in HEAD_PRIORITY if n in names] + sorted(n for n in names if n not in HEAD_PRIORITY)


def architectures(heads: bool) -> list[dict]:
    """One entry per (model_type, Auto class): the base class, else the first head; with ``heads`` also the first
    head of every model type that has a base class. Model types with no class at all are kept (status ``setup``)."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    autos = auto_classes()
    mappings = {a: getattr(modeling_auto, a)._model_mapping._model_mapping for a in autos}
    entries = []
    for model_type in CONFIG_MAPPING_NAMES:
        found = [(a, mappings[a][model_type]) for a in autos if model_type in mappings[a]]
        found = [(a, c[0] if isinstance(c, (list, tuple)) else c) for a, c in found]
        if not found:
            entries.append({"model_type": model_type, "auto": None, "class": None})
            continue
        entries.append({"model_type": model_type, "auto": found[0][0], "class": found[0][1]})
        if heads and found[0][0] == "AutoModel" and len(found) > 1:
            entries.append({"model_type": model_type, "auto": found[1][0], "class": found[1][1]})
    return entries


# ------------------------------------------------------------------------------------------------ tiny configs
#: the shrinks tried in turn: every key shrunk; only dataclass fields (derived keys computed again); the same with 8
#: layers (hybrids whose first attention layer comes late); only fewer layers (if that stays under 30M parameters)
MODES = ("tiny", "tiny-fields", "tiny8", "layers")
HIDDEN, HEADS, LAYERS, FFN, HEAD_DIM, VOCAB, IMAGE, LIST_FACTOR = 32, 2, 2, 38, 16, 99, 64, 8

_LAYER_KEYS = re.compile(r"^(num_hidden_layers|num_layers|n_layers?|encoder_layers|decoder_layers|"
                         r"num_(encoder|decoder|text|vision|audio|global|local|cross)_layers|"
                         r"(encoder|decoder|text|vision|audio)_num_layers|num_(hidden_)?blocks|depth)$")
_HEAD_KEYS = re.compile(r"(^|_)(num_attention_heads|num_heads|n_heads?|attention_heads|num_key_value_heads|"
                        r"num_kv_heads|n_kv_heads|kv_heads|key_heads|value_heads|num_query_groups|"
                        r"multi_query_group_num)$")
_KV_HEAD_KEYS = re.compile(r"(key_value|kv|query_groups|query_group_num)")
_FFN_KEYS = re.compile(r"(intermediate|ffn|(^|_)d_ff$|mlp_dim|feedforward|feed_forward|(^|_)d_inner$|n_inner|"
                       r"mlp_hidden|expert_dim|dim_ff)")
_ROPE_DIM_KEYS = re.compile(r"(qk_rope_head_dim|qk_nope_head_dim|rotary_dim)$")
_HEAD_DIM_KEYS = re.compile(r"(head_dim|head_size|^d_kv$|dim_head|d_head|kv_channels)$")
_RANK_KEYS = re.compile(r"(lora_rank|_rank$|state_size|d_state)$")
_VOCAB_KEYS = re.compile(r"(^|_)vocab_size$")
_IMAGE_KEYS = re.compile(r"^(image_size|img_size|pretrain_image_size|crop_size|input_size)$")
_DIM_KEYS = re.compile(r"(hidden_size|hidden_dim|^d_model$|^n_embd$|embed_dim|^dim$|model_dim|^width$|embedding_size|"
                       r"^d_embed$|projection_dim|proj_dim|_channels$|channels_|output_dim|^emb_dim$|^hidden$|"
                       r"embedding_dim|_width$|^d_latents$|hidden_size_|codebook_dim|adapter_in_dim)")
_TOKEN_KEYS = re.compile(r"(token_id|token_index|_token_ids|^pad_token_id|^bos_token_id|^eos_token_id)")
_EXPERT_KEYS = re.compile(r"^(num_local_experts|num_experts|n_routed_experts|moe_num_experts)$")
_INDEX_KEYS = re.compile(r"(indexes|indices|_idxs|layer_ids|_layers$|feature_layers?$)")
_SKIP_KEYS = re.compile(r"(position|max_|label|sampling_rate|hop_length|window|chunk|_bins$|num_mel|seq_len|"
                        r"strides?$|kernel|patch|codebook_size|num_queries|_length$|_stride$|stack|^num_channels$|"
                        r"feature_size|input_feat)")


_NONE_DEFAULTS = {"head_dim": HIDDEN // HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB}


def _ints(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value)


def _is_config(value) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _max_token_id(d: dict) -> int:
    best = -1
    for key, value in d.items():
        if _is_config(value):
            best = max(best, _max_token_id(value))
        elif _TOKEN_KEYS.search(key) and isinstance(value, int) and not isinstance(value, bool):
            best = max(best, value)
        elif _TOKEN_KEYS.search(key) and _ints(value):
            best = max(best, max(value))
    return best


def _shrink_list(key: str, value: list, old_layers: int | None, new_layers: int, keep: list[int] | None):
    if keep is not None and old_layers and len(value) == old_layers and old_layers != new_layers:
        value = [value[i] for i in keep]  # a per-layer list
    if not _ints(value):
        return value
    if _INDEX_KEYS.search(key) and old_layers and max(value) >= new_layers and max(value) < old_layers:
        # clamped, not spread: Mllama's cross-attention layers [3, 8, ...] become [1, 1, ...], not every layer
        return [min(v, new_layers - 1) for v in value]
    if "depth" in key or key == "block_sizes":
        return [min(v, 1) for v in value]
    if _HEAD_KEYS.search(key):
        return [1 for _ in value]
    if _SKIP_KEYS.search(key) or _TOKEN_KEYS.search(key):
        return value
    if (_DIM_KEYS.search(key) or _FFN_KEYS.search(key) or "sizes" in key or "dims" in key
            or key == "out_features") and max(value) >= 32:
        return [max(v // LIST_FACTOR, 4) if v >= 16 else v for v in value]
    return value


def _fields(cls) -> set[str] | None:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None


def _sub_class(cls, key: str, value: dict):
    from transformers import CONFIG_MAPPING, PretrainedConfig

    sub = (getattr(cls, "sub_configs", None) or {}).get(key)
    if isinstance(sub, type) and issubclass(sub, PretrainedConfig) and sub.model_type == value["model_type"]:
        return sub
    return CONFIG_MAPPING[value["model_type"]] if value["model_type"] in CONFIG_MAPPING else sub


def fields_only(d: dict, cls, drop: bool = True) -> dict:
    """The config dict without the keys that the config computes from its fields (``head_dim`` of DeepSeek-V3,
    ``num_layers`` of Swin, backbone ``stage_names``): they are computed again from the shrunk fields. (Some configs
    read such keys from their kwargs instead, hence the mode that keeps them.)"""
    fields = _fields(cls)
    if fields is None or not drop:
        return dict(d)
    return {k: v for k, v in d.items() if k in fields or _is_config(v) or k == "model_type"}


def shrink(d: dict, vocab: int, cls=None, layers: int = LAYERS, drop: bool = False) -> dict:
    """A tiny version of a config dict (and of its sub-configs), with at most ``layers`` layers (8: for hybrid models
    whose first attention layer comes late); ``drop``: without the keys that are no dataclass fields."""
    d = fields_only(d, cls, drop)
    layer_key = next((k for k in d if _LAYER_KEYS.match(k) and isinstance(d[k], int) and d[k] > layers), None)
    old_layers = d[layer_key] if layer_key else None
    keep = None
    if old_layers:
        types = d.get("layer_types") or d.get("block_types") or d.get("layers_block_type")
        if isinstance(types, list) and len(types) == old_layers:
            keep = list(dict.fromkeys(types.index(t) for t in types))[:layers]
            keep += [i for i in range(old_layers) if i not in keep][:layers - len(keep)]
            keep.sort()
        else:
            keep = list(range(layers))
    heads_old = {k: v for k, v in d.items()
                 if _HEAD_KEYS.search(k) and isinstance(v, int) and not _KV_HEAD_KEYS.search(k)}
    for key, value in list(d.items()):
        if _is_config(value) and value["model_type"] == "timm_backbone":  # timm is not installed: a ResNet instead
            from transformers import ResNetConfig

            value = ResNetConfig(out_indices=value.get("out_indices") or [1, 2, 3, 4]).to_dict()
            d[key] = shrink(value, vocab, ResNetConfig, layers, drop)
        elif _is_config(value):
            d[key] = shrink(value, vocab, _sub_class(cls, key, value), layers, drop)
        elif isinstance(value, dict):
            d[key] = _shrink_rope(key, value)
        elif isinstance(value, list):
            d[key] = _shrink_list(key, value, old_layers, layers, keep)
        elif key in ("use_timm_backbone", "use_pretrained_backbone") and value is True:  # DETR: no timm, no hub
            d[key] = False
        elif value is None and key in _NONE_DEFAULTS:  # left unset by the default config, set by the testers
            d[key] = _NONE_DEFAULTS[key] if key != "vocab_size" else vocab
        elif isinstance(value, bool) or not isinstance(value, int):
            continue
        elif _LAYER_KEYS.match(key) and value > layers:
            d[key] = layers
        elif _EXPERT_KEYS.match(key) and value > 4:
            d[key] = 4
        elif key in ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token") and value > 2:
            d[key] = 2
        elif key in ("n_group", "topk_group", "num_expert_group"):
            d[key] = 1
        elif _VOCAB_KEYS.search(key) and value > vocab:
            d[key] = vocab
        elif _IMAGE_KEYS.match(key) and value > IMAGE:
            d[key] = IMAGE
        elif _HEAD_KEYS.search(key) and value > HEADS:
            if _KV_HEAD_KEYS.search(key):
                d[key] = HEADS if value in heads_old.values() else 1
            else:
                d[key] = HEADS
        elif _SKIP_KEYS.search(key) or _TOKEN_KEYS.search(key):
            continue
        elif _ROPE_DIM_KEYS.search(key) and value > HEAD_DIM // 2:
            d[key] = HEAD_DIM // 2
        elif _HEAD_DIM_KEYS.search(key) and value > HEAD_DIM:
            d[key] = HEAD_DIM
        elif _RANK_KEYS.search(key) and value > HEAD_DIM:
            d[key] = HEAD_DIM
        elif _FFN_KEYS.search(key) and value > FFN:
            d[key] = FFN
        elif _DIM_KEYS.search(key) and value > HIDDEN:
            d[key] = HIDDEN
    for key in ("layer_types", "block_types", "layers_block_type"):
        if isinstance(d.get(key), list) and layer_key and len(d[key]) != d[layer_key]:
            d[key] = d[key][:d[layer_key]]
    if isinstance(d.get("image_size"), list) and _ints(d["image_size"]) and max(d["image_size"]) > IMAGE:
        d["image_size"] = [IMAGE] * len(d["image_size"])
    _consistent(d)
    rope = d.get("rope_parameters")
    if ("mrope_section" in getattr(cls, "ignore_keys_at_rope_validation", ()) and isinstance(rope, dict)
            and "mrope_section" not in rope):  # Qwen2-VL's rotary embedding defaults to [16, 24, 24]
        d["rope_parameters"] = rope = {**rope, "mrope_section": [16, 24, 24]}
    rope_dim = d.get("qk_rope_head_dim") or d.get("head_dim") or HEAD_DIM
    if isinstance(rope, dict) and isinstance(rope_dim, int):
        d["rope_parameters"] = _shrink_rope("", rope, rope_dim // 2)
    for key, value in list(d.items()):  # indices of hidden states (-2: the one before the last) are kept in range
        if "feature_layer" in key and isinstance(value, int) and value >= layers:
            d[key] = -1
        elif "feature_layer" in key and _ints(value) and max(value) >= layers:
            d[key] = [-1 - i for i in range(len(value))]
    return d


def _consistent(d: dict) -> None:
    """Relations between shrunk fields that configs check: Mamba-2's ``num_heads * head_dim == expand * hidden``."""
    hidden, expand = d.get("hidden_size"), d.get("expand") or d.get("mamba_expand")
    if isinstance(hidden, int) and isinstance(expand, (int, float)):
        for heads_key, dim_key in (("num_heads", "head_dim"), ("mamba_n_heads", "mamba_d_head"),
                                   ("mamba_num_heads", "mamba_head_dim"), ("n_mamba_heads", "mamba_headdim")):
            if isinstance(d.get(heads_key), int) and isinstance(d.get(dim_key), int):
                d[dim_key] = int(hidden * expand) // d[heads_key]


def _shrink_rope(key: str, value: dict, target: int = HEAD_DIM // 2) -> dict:
    value = dict(value)
    for k, v in list(value.items()):
        if isinstance(v, dict):
            value[k] = _shrink_rope(k, v, target)
        elif k == "mrope_section" and _ints(v) and sum(v) != target:  # sums to the rotary dimension / 2
            total = sum(v)
            parts = [max(1, round(x * target / total)) for x in v]
            parts[0] += target - sum(parts)
            value[k] = parts
    return value


def tiny_config(model_type: str, mode: str):
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    config = config_cls()
    if mode == "default":
        return config
    d = config.to_dict()
    vocab = max(VOCAB, _max_token_id(d) + 1)
    if mode.startswith("tiny"):
        d = shrink(d, vocab, config_cls, layers=8 if mode == "tiny8" else LAYERS, drop=mode != "tiny")
    else:
        d = shrink_layers_only(d, vocab, config_cls)
    for key in ("transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    return config_cls.from_dict(d)


def shrink_layers_only(d: dict, vocab: int, cls=None) -> dict:
    """Only fewer layers, a smaller vocabulary and fewer experts (for configs that the tiny shrink breaks)."""
    d = fields_only(d, cls)
    for key, value in list(d.items()):
        if _is_config(value):
            d[key] = shrink_layers_only(value, vocab, _sub_class(cls, key, value))
        elif isinstance(value, int) and not isinstance(value, bool):
            if _LAYER_KEYS.match(key) and value > LAYERS:
                d[key] = LAYERS
            elif _VOCAB_KEYS.search(key) and value > vocab:
                d[key] = vocab
            elif _EXPERT_KEYS.match(key) and value > 4:
                d[key] = 4
    layer_key = next((k for k in d if _LAYER_KEYS.match(k) and isinstance(d[k], int)), None)
    for key in ("layer_types", "block_types", "layers_block_type"):
        if isinstance(d.get(key), list) and layer_key:
            d[key] = d[key][:d[layer_key]]
    return d


# ------------------------------------------------------------------------------------------------ inputs, outputs
def flat_tensors(value, prefix: str = "out") -> dict:
    """Every floating tensor of a model output, by path."""
    import torch

    found = {}
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            found[prefix] = value.detach()
    elif isinstance(value, dict):  # ModelOutput is an OrderedDict
        for k, v in value.items():
            found.update(flat_tensors(v, f"{prefix}.{k}"))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found.update(flat_tensors(v, f"{prefix}[{i}]"))
    return found


def difference(a: dict, b: dict) -> tuple[float, float, str]:
    """(max abs difference, max relative difference, worst key) over the tensors of two outputs; inf on a mismatch."""
    if set(a) != set(b):
        return math.inf, math.inf, f"keys differ: {sorted(set(a) ^ set(b))[:3]}"
    worst, worst_rel, where = 0.0, 0.0, ""
    for key, x in a.items():
        y = b[key]
        if x.shape != y.shape:
            return math.inf, math.inf, f"{key}: shape {tuple(y.shape)} vs {tuple(x.shape)}"
        if x.numel() == 0:
            continue
        diff = (x.double() - y.double()).abs() if not x.is_complex() else (x - y).abs().double()
        both_nan = x.isnan() & y.isnan()
        diff = diff.masked_fill(both_nan, 0.0)
        d = float(diff.max())
        scale = float(x.abs().double().masked_fill(x.isnan(), 0.0).max())
        rel = d / scale if scale > 0 else (0.0 if d == 0 else math.inf)
        if math.isnan(d):
            d = rel = math.inf
        if rel > worst_rel or d > worst:
            where = key
        worst, worst_rel = max(worst, d), max(worst_rel, rel)
    return worst, worst_rel, where


def input_candidates(model) -> list[tuple[str, dict]]:
    """Inputs to try, in order: the library's dummy_inputs, then variants built here."""
    import inspect

    import torch

    from hf_layercollapse.units.tracing import _first_value, dummy_inputs

    candidates = []
    try:
        base = dummy_inputs(model)
        candidates.append(("dummy_inputs", base))
    except Exception as err:
        base = {}
        candidates.append((f"dummy_inputs failed: {type(err).__name__}: {first_line(err)}", None))
    params = inspect.signature(model.forward).parameters
    config = model.config
    g = torch.Generator().manual_seed(1)
    if "pixel_values" in base:
        text_only = {k: v for k, v in base.items() if k != "pixel_values"}
        if text_only:
            candidates.append(("dummy_inputs without pixel_values", text_only))
        vision_only = {k: v for k, v in base.items() if k not in ("input_ids", "attention_mask")}
        if len(vision_only) < len(base):
            candidates.append(("dummy_inputs without input_ids", vision_only))
    if "input_features" in base and base["input_features"].dim() == 3:  # (batch, frames, features) layouts
        features = base["input_features"]
        frames = min(features.shape[2], 200)
        candidates.append(("input_features as (batch, frames, mels)",
                           {**base, "input_features": features[:, :, :frames].transpose(1, 2).contiguous()}))
        if "input_features_mask" in params or "attention_mask" in params:
            key = "input_features_mask" if "input_features_mask" in params else "attention_mask"
            candidates.append((f"input_features as (batch, frames, mels) with {key}",
                               {**{k: v for k, v in base.items() if k != "attention_mask"},
                                "input_features": features[:, :, :frames].transpose(1, 2).contiguous(),
                                key: torch.ones(1, frames, dtype=torch.long)}))
    extra = dict(base)
    if "input_values" in params and "input_values" not in extra:
        extra["input_values"] = torch.randn(1, 4000, generator=g, dtype=torch.float64)
    if "pixel_values" in params and "pixel_values" not in extra and "input_ids" not in extra:
        size = _first_value(config, ("image_size",), IMAGE)
        size = size if isinstance(size, int) else max(size)
        channels = int(_first_value(config, ("num_channels",), 3))
        extra["pixel_values"] = torch.randn(1, channels, size, size, generator=g, dtype=torch.float64)
    if "input_ids" in params and "input_ids" not in extra and not any(k in extra for k in ("input_values",)):
        extra["input_ids"] = (torch.arange(8) % 90 + 1).unsqueeze(0)
    if "decoder_input_ids" in params and "decoder_input_ids" not in extra and (
            getattr(config, "is_encoder_decoder", False) or "input_features" in extra):
        start = getattr(config, "decoder_start_token_id", None) or 0
        extra["decoder_input_ids"] = torch.full((1, 4), int(start), dtype=torch.long)
    if extra and extra.keys() != base.keys():
        candidates.append(("own inputs", extra))
    if "input_ids" in params and "inputs_embeds" not in base:
        candidates.append(("input_ids only", {"input_ids": (torch.arange(8) % 90 + 1).unsqueeze(0)}))
    if "use_cache" in params:  # hybrids whose tiny version has no attention layer left for the cache
        candidates += [(f"{how}, use_cache=False", {**inputs, "use_cache": False})
                       for how, inputs in list(candidates) if inputs is not None]
    return candidates


def first_line(err: BaseException, limit: int = 160) -> str:
    text = [t.strip() for t in str(err).strip().splitlines() if t.strip()]
    line = text[0] if text else ""
    if line.endswith(":") and len(text) > 1:  # "Class validation error for validator ...:" then the cause
        line = f"{line} {text[1]}"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def where(err: BaseException) -> str:
    """The innermost frame of an exception, as ``package/file.py:function``."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    path = Path(frame.filename).as_posix()
    for marker in ("hf_layercollapse/", "transformers/", "torch/"):
        if marker in path:
            path = marker + path.split(marker, 1)[1]
            break
    else:
        path = Path(path).name
    return f"{path}:{frame.name}"


def library_frame(err: BaseException) -> bool:
    """Whether the exception was raised by hf_layercollapse itself (not by the model's forward inside it)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and "hf_layercollapse" in Path(frames[-1].filename).as_posix()


# ------------------------------------------------------------------------------------------------ one architecture
class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def run_one(entry: dict, timeout: float) -> dict:
    row = {"architecture": entry["model_type"], "class": entry["class"] or "", "status": "", "detail": ""}
    if entry["class"] is None:
        row.update(status="setup: no model class", detail="no Auto model class lists this model type "
                                                          "(a sub-model config)")
        return row
    phase = ["start"]
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        row.update(_sweep(entry, phase))
    except Timeout:
        row.update(status="timeout", detail=f"over {timeout:.0f} s, in phase {phase[0]}")
    except Exception as err:
        row.update(status=f"crash ({phase[0]})", detail=f"{type(err).__name__} at {where(err)}: {first_line(err)}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _forward(model, inputs: dict) -> dict:
    import torch

    torch.manual_seed(0)  # models that draw noise in forward (ViTMAE's masking) draw the same each time
    with torch.no_grad():
        return flat_tensors(model(**inputs))


def _from_config(model_class, config):
    """The model, with the eager experts (grouped_mm has no float64 kernel on CPU)."""
    try:
        return model_class._from_config(config, experts_implementation="eager")
    except (TypeError, ValueError):
        return model_class._from_config(config)


def _build(entry: dict, phase: list):
    """The tiny model and its inputs, or a setup failure (a row update)."""
    import torch
    from transformers.models.auto import modeling_auto

    auto = getattr(modeling_auto, entry["auto"])
    errors = []
    try:
        model_class = getattr(importlib.import_module("transformers"), entry["class"])
    except Exception as err:
        return None, [f"{MODES[0]}: {type(err).__name__}: {first_line(err, 120)}"]
    for mode in MODES:
        phase[0] = f"build ({mode} config)"
        try:
            config = tiny_config(entry["model_type"], mode)
            if mode == "layers":
                with torch.device("meta"):
                    meta = _from_config(model_class, config)
                size = sum(p.numel() for p in meta.parameters())
                del meta
                if size > 30_000_000:
                    errors.append(f"{mode}: {size / 1e6:.0f}M parameters, too big")
                    continue
            torch.manual_seed(0)
            model = _from_config(model_class, config).double().eval()
        except Timeout:
            raise
        except Exception as err:
            errors.append(f"{mode}: {type(err).__name__}: {first_line(err, 120)}")
            continue
        phase[0] = "reference forward"
        for how, inputs in input_candidates(model):
            if inputs is None:
                errors.append(how)
                continue
            try:
                reference = _forward(model, inputs)
            except Timeout:
                raise
            except Exception as err:
                errors.append(f"{mode}/{how}: {type(err).__name__} at {where(err)}: {first_line(err, 120)}")
                continue
            if not reference:
                errors.append(f"{mode}/{how}: no floating output")
                continue
            bad = [k for k, t in reference.items() if not bool(torch.isfinite(t).all())]
            if bad:  # a random tiny model that overflows (or masks with NaN) says nothing about the library
                errors.append(f"{mode}/{how}: the original model's output is not finite ({bad[0]})")
                continue
            return model, inputs, how, mode, reference, auto
        del model
    return None, errors


def _sweep(entry: dict, phase: list) -> dict:
    import torch

    import hf_layercollapse as hlc
    from hf_layercollapse.errors import LayerCollapseConfigError

    built = _build(entry, phase)
    if built[0] is None:
        errors = built[1]
        kind = "build" if all(e.split(":")[0] in MODES for e in errors) else "forward"
        tiny = [e for e in errors if e.startswith("tiny")]
        shown = (tiny[:1] + errors[-1:]) if tiny else errors[-2:]
        return {"status": f"setup: {kind} failed", "detail": " | ".join(dict.fromkeys(shown)), "errors": errors}
    model, inputs, how, mode, reference, auto = built
    notes = [] if mode == "tiny" else [f"config: {mode}"]

    def control() -> float:
        """The same round trip without the library: a fresh tiny model saved and reloaded by transformers."""
        with tempfile.TemporaryDirectory(prefix="zoo_") as folder:
            torch.manual_seed(0)
            plain_class = getattr(importlib.import_module("transformers"), entry["class"])
            fresh = _from_config(plain_class, tiny_config(entry["model_type"], mode)).double().eval()
            fresh.save_pretrained(folder)
            loaded = auto.from_pretrained(folder, dtype=torch.float64).eval()
            return difference(_forward(fresh, inputs), _forward(loaded, inputs))[1]

    if how != "dummy_inputs":
        notes.append(f"inputs: {how}")
    capture = _Capture()
    logger = logging.getLogger("hf_layercollapse")
    logger.addHandler(capture)
    try:
        return _check(model, inputs, how, reference, auto, phase, notes, capture, control, hlc, torch,
                      LayerCollapseConfigError)
    finally:
        logger.removeHandler(capture)


def _check(model, inputs, how, reference, auto, phase, notes, capture, control, hlc, torch, config_error) -> dict:
    def done(status: str, detail: str = "") -> dict:
        extra = [*notes, *(f"log: {m[:140]}" for m in dict.fromkeys(capture.messages))]
        return {"status": status, "detail": "; ".join([detail, *extra] if detail else extra)}

    phase[0] = "get_collapse_model"
    example = None if how == "dummy_inputs" else inputs
    try:
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(), example_inputs=example)
    except Timeout:
        raise
    except (ValueError, config_error) as err:
        message = first_line(err)
        if "No MLP block" in message:
            return done("no MLP")
        if library_frame(err):
            return done(f"refused: {_reason(message)}", message)
        return done("crash (inject)", f"{type(err).__name__} at {where(err)}: {message}")
    except Exception as err:
        return done("crash (inject)", f"{type(err).__name__} at {where(err)}: {first_line(err)}")
    acts = hlc.injected_activations(model)
    kinds = Counter(type(a.layout).__name__.replace("Layout", "").lower() for a in acts.values())
    names = list(acts)
    notes.insert(0, f"{len(acts)} blocks ({', '.join(f'{n} {k}' for k, n in kinds.items())}; "
                    f"first {names[0] if names else '-'})")

    phase[0] = "alpha=0 forward"
    out0 = _forward(model, inputs)
    diff0, _, key0 = difference(reference, out0)
    if not diff0 <= 1e-10:
        return done("wrong (injection changes outputs)", f"α=0: max |diff| {diff0:.3g} at {key0}")

    phase[0] = "alpha=1 forward"
    with torch.no_grad():
        for act in acts.values():
            act.alpha.data.fill_(1.0)
    out1 = _forward(model, inputs)
    moved, _, _ = difference(reference, out1)
    if moved == 0.0:
        notes.append("α=1 leaves the outputs unchanged")

    phase[0] = "collapse_model"
    try:
        report = hlc.collapse_model(model)
    except Timeout:
        raise
    except (ValueError, config_error) as err:
        message = first_line(err)
        if "Merging changed the output" in message:
            return done("refused (merge check)", message)
        if library_frame(err):
            return done(f"refused (collapse): {_reason(message)}", message)
        return done("crash (collapse)", f"{type(err).__name__} at {where(err)}: {message}")
    except Exception as err:
        return done("crash (collapse)", f"{type(err).__name__} at {where(err)}: {first_line(err)}")
    statuses = Counter(b.status for b in report.blocks)
    notes.insert(1, "merged " + ", ".join(f"{n} {s}" for s, n in statuses.items()))
    phase[0] = "collapsed forward"
    out_c = _forward(model, inputs)
    diff_c, rel_c, key_c = difference(out1, out_c)
    if not rel_c <= 1e-8:
        return done("wrong (collapse)", f"collapsed vs α=1: max |diff| {diff_c:.3g} (relative {rel_c:.3g}) at {key_c}")

    phase[0] = "save_pretrained"
    with tempfile.TemporaryDirectory(prefix="zoo_") as folder:
        try:
            model.save_pretrained(folder)
        except Timeout:
            raise
        except (ValueError, config_error) as err:
            if library_frame(err):
                return done(f"refused (save): {_reason(first_line(err))}", first_line(err))
            return done("crash (save)", f"{type(err).__name__} at {where(err)}: {first_line(err)}")
        except Exception as err:
            return done("crash (save)", f"{type(err).__name__} at {where(err)}: {first_line(err)}")
        phase[0] = "from_pretrained"
        try:
            loaded = auto.from_pretrained(folder, dtype=torch.float64).eval()
            phase[0] = "reloaded forward"
            out_r = _forward(loaded, inputs)
        except Timeout:
            raise
        except Exception as err:
            text = f"{type(err).__name__} at {where(err)}: {first_line(err)}"
            phase[0] = "control round trip"
            try:
                plain = control()
            except Timeout:
                raise
            except Exception as err:
                return done("setup: reload fails in plain transformers",
                            f"{text}; a plain save/reload without the library fails too: {type(err).__name__}")
            if not plain <= 1e-8:  # transformers loses weights of this model itself: the library refused to
                return done("setup: reload inexact in plain transformers",
                            f"{text}; a plain save/reload without the library differs by {plain:.3g} (relative)")
            return done("crash (reload)", text)
    diff_r, rel_r, key_r = difference(out1, out_r)
    if not rel_r <= 1e-8:
        phase[0] = "control round trip"
        try:
            plain = control()
        except Timeout:
            raise
        except Exception as err:
            plain = f"failed: {type(err).__name__}: {first_line(err, 80)}"
        text = f"reloaded vs α=1: max |diff| {diff_r:.3g} (relative {rel_r:.3g}) at {key_r}"
        if isinstance(plain, float) and not plain <= 1e-8:
            return done("setup: reload inexact in plain transformers",
                        f"{text}; a plain save/reload without the library differs by {plain:.3g} (relative) too")
        return done("wrong (reload)", f"{text}; plain transformers round trip: "
                                      f"{plain if isinstance(plain, str) else f'{plain:.3g}'}")
    if statuses.get("collapsed", 0) == 0:
        return done("exact (nothing merged)")
    return done("exact")


def _reason(message: str) -> str:
    """A short class of a refusal, for the summary."""
    rules = (("mixture-of-experts", "mixture of experts"), ("is shared by MLP blocks", "shared activation"),
             ("are shared with", "tied weights"), ("Cannot build example inputs", "no example inputs"),
             ("never reached the blocks", "calibration data never reached some blocks"))
    for needle, reason in rules:
        if needle in message:
            return reason
    return message[:60]


# ------------------------------------------------------------------------------------------------ worker / driver
def worker(names: list[str], heads: bool, timeout: float) -> None:
    import torch
    import transformers

    torch.set_num_threads(1)
    # float64 from the start: buffers computed at construction (rotary frequencies, embedding scales) are then built
    # as from_pretrained(dtype=torch.float64) builds them, not computed in float32 and cast
    torch.set_default_dtype(torch.float64)
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    by_key = {f"{e['model_type']}|{e['auto']}": e for e in architectures(heads)}
    for key in names:
        print(PREFIX + json.dumps({"start": key}), flush=True)
        row = run_one(by_key[key], timeout)
        row["auto"] = by_key[key]["auto"]
        print(PREFIX + json.dumps({"row": row}), flush=True)
        gc.collect()


def _spawn(keys: list[str], args) -> subprocess.Popen:
    command = [sys.executable, __file__, "--worker", "--timeout", str(args.timeout)]
    if args.heads:
        command.append("--heads")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=env, start_new_session=True)
    process.stdin.write("\n".join(keys) + "\n")
    process.stdin.close()
    return process


def drive(keys: list[str], args) -> list[dict]:
    """Run ``keys`` in ``args.jobs`` worker processes (each restarted after a hang or a hard crash)."""
    pending = list(keys)
    rows: dict[str, dict] = {}
    chunk = max(1, math.ceil(len(pending) / args.jobs))
    queues = [pending[i:i + chunk] for i in range(0, len(pending), chunk)]
    workers: dict[int, dict] = {}
    selector = selectors.DefaultSelector()

    def start(queue: list[str]) -> None:
        if not queue:
            return
        process = _spawn(queue, args)
        state = {"process": process, "queue": queue, "current": None, "since": time.monotonic()}
        workers[process.pid] = state
        selector.register(process.stdout, selectors.EVENT_READ, state)

    def finish(state: dict, status: str, detail: str) -> None:
        selector.unregister(state["process"].stdout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(state["process"].pid, signal.SIGKILL)
        state["process"].wait()
        del workers[state["process"].pid]
        current = state["current"] or (state["queue"][0] if state["queue"] else None)
        if current is not None and current not in rows:
            model_type, auto = current.split("|")
            rows[current] = {"architecture": model_type, "class": auto, "status": status, "detail": detail,
                             "auto": auto}
            _print_row(rows[current], len(rows), len(keys))
        rest = [k for k in state["queue"] if k not in rows]
        start(rest)

    for queue in queues:
        start(queue)
    hard = args.timeout + 60
    while workers:
        for sel_key, _ in selector.select(timeout=5):
            state = sel_key.data
            line = state["process"].stdout.readline()
            if not line:
                code = state["process"].poll()
                finish(state, "crash (worker died)", f"the worker process ended (exit status {code})")
                continue
            if not line.startswith(PREFIX):
                continue
            message = json.loads(line[len(PREFIX):])
            state["since"] = time.monotonic()
            if "start" in message:
                state["current"] = message["start"]
            else:
                key = f"{message['row']['architecture']}|{message['row']['auto']}"
                rows[key] = message["row"]
                state["current"] = None
                _print_row(rows[key], len(rows), len(keys))
        for state in list(workers.values()):
            if time.monotonic() - state["since"] > hard:
                finish(state, "timeout", f"hard timeout: no answer in {hard:.0f} s (the worker was killed)")
    return [rows[k] for k in keys if k in rows]


def _print_row(row: dict, done: int, total: int) -> None:
    print(f"[{done}/{total}] {row['architecture']:<32} {row['status']:<34} {row['detail'][:150]}", flush=True)


def status_group(status: str) -> str:
    if status.startswith("exact"):
        return "exact"
    if status.startswith("refused"):
        return "refused"
    for group in ("no MLP", "wrong", "crash", "timeout", "setup"):
        if status.startswith(group):
            return group
    return status


def write(rows: list[dict], args, seconds: float) -> str:
    import torch
    import transformers

    groups = Counter(status_group(r["status"]) for r in rows)
    statuses = Counter(r["status"] for r in rows)
    env = {"command": " ".join(["python", "scripts/zoo_sweep.py", *sys.argv[1:]]), "transformers":
           transformers.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.platform(), "seconds": round(seconds, 1), "timeout_per_model_s": args.timeout}
    order = ["exact", "refused", "no MLP", "wrong", "crash", "timeout", "setup"]
    summary = [f"| {g} | {groups[g]} |" for g in order if groups.get(g)]
    detail = [f"| {s} | {n} |" for s, n in sorted(statuses.items(), key=lambda x: (order.index(status_group(x[0]))
                                                                                   if status_group(x[0]) in order
                                                                                   else 99, -x[1]))]
    table = ["| architecture | class | status | detail |", "|---|---|---|---|"]
    for r in rows:
        if r["status"] == "setup: no model class":
            continue
        text = r["detail"].replace("|", "\\|").replace("\n", " ")
        table.append(f"| {r['architecture']} | {r['class']} | {r['status']} | {text} |")
    no_class = [r["architecture"] for r in rows if r["status"] == "setup: no model class"]
    tested = len(rows) - len(no_class)
    verdict = tested - (groups.get("setup", 0) - len(no_class))
    ran = [r for r in rows if not r["status"].startswith(("setup", "timeout"))]
    own_inputs = [r for r in ran if "inputs: " in r["detail"]]
    unverified = [r for r in ran if "Merges not verified" in r["detail"]]
    bad = [r for r in rows if status_group(r["status"]) in ("wrong", "crash", "timeout")
           or r["status"] == "refused (merge check)"]
    lines = [
        "# Zoo sweep: every transformers architecture, tiny, through inject → collapse → reload",
        "",
        f"Command: `{env['command']}`; transformers {env['transformers']}, torch {env['torch']}, "
        f"Python {env['python']}, {env['machine']}; {env['seconds']:.0f} s, at most {args.timeout:.0f} s a model.",
        "",
        "Each architecture: its `model_type`'s default config shrunk generically (hidden 32, 2 heads, 2 layers, FFN "
        f"{FFN}, vocabulary 99, images 64 px; other shrinks tried in turn when one fails to build or run: "
        f"{', '.join(MODES[1:])}), its `AutoModel` class (else the first task head), float64, eval mode. "
        "Steps: `get_collapse_model(model, LayerCollapseConfig())`; α = 0 output vs the original (≤ 1e-10 "
        "absolute); every α = 1, `collapse_model`, output vs α = 1 (≤ 1e-8 relative); `save_pretrained` + the same "
        "Auto class's `from_pretrained`, output vs α = 1 (≤ 1e-8 relative). Every floating tensor of the output is "
        "compared. `setup` rows are models this script could not build or run (no verdict on the library).",
        "",
        f"{tested} architectures with a model class ({verdict} with a verdict, timeouts included); "
        f"{len(no_class)} model types without one (sub-model configs) are listed at the end. "
        f"Of the {len(ran)} that reached the library, {len(own_inputs)} ran on inputs built here because "
        "`dummy_inputs` could not build theirs or their forward rejected them (`inputs:` in the detail), and "
        f"{len(unverified)} had `collapse_model`'s own merge check skipped (`Merges not verified` in the detail: its "
        "probe forward runs on `dummy_inputs`).",
        "",
        "Wrong, crashed, timed out or caught by the merge check:",
        "",
        *[f"- {r['architecture']} ({r['class']}): {r['status']}: {r['detail'][:200]}" for r in bad],
        "",
        "| group | count |", "|---|---|", *summary, "",
        "| status | count |", "|---|---|", *detail, "",
        *table, "",
    ]
    if no_class:
        lines += ["Model types without a model class: " + ", ".join(no_class) + ".", ""]
    text = "\n".join(lines)
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "zoo_sweep.md").write_text(text)
        (RESULTS / "zoo_sweep.json").write_text(json.dumps(
            {"environment": env, "summary": dict(groups), "statuses": dict(statuses), "rows": rows}, indent=1) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types (e.g. bert,llama)")
    parser.add_argument("--limit", type=int, help="the first N architectures only")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1: the machine is shared)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per architecture (default 20)")
    parser.add_argument("--heads", action="store_true", help="also sweep the first task head of every architecture")
    parser.add_argument("--no-write", dest="write", action="store_false",
                        help="print only; do not write benchmarks/results/zoo_sweep.{md,json}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker([line.strip() for line in sys.stdin if line.strip()], args.heads, args.timeout)
        return
    entries = architectures(args.heads)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {e["model_type"] for e in entries}
        if unknown:
            parser.error(f"unknown model types: {sorted(unknown)}")
        entries = [e for e in entries if e["model_type"] in wanted]
    if args.limit is not None:
        entries = entries[:args.limit]
    started = time.perf_counter()
    rows = drive([f"{e['model_type']}|{e['auto']}" for e in entries], args)
    text = write(rows, args, time.perf_counter() - started)
    print()
    print(text)


if __name__ == "__main__":
    main()
