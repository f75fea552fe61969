"""Folder-level atomic saves and manifests: a reader of a checkpoint or plan folder sees the old complete state or the
new complete state, never a mix and never nothing.

A save writes into a fresh sibling folder (``.NAME.layercollapse-tmp-PID-TOKEN``), copies in the files of the old
folder that the save does not own (a tokenizer saved beside the model, a README), writes a manifest of every file
with its size and SHA-256, and then exchanges the two folders in one step (``renameat2(RENAME_EXCHANGE)`` on Linux;
elsewhere two renames, with the old folder kept aside until the new one is in place and restored by the next save or
load if a process died in between). Temporary folders of processes that died are removed by the next save.
:func:`verify_manifest` is what loaders call: a file missing, changed, or a weight file that the manifest does not
know (a stale shard, a single-file checkpoint beside shards) is an error that names the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import CheckpointIntegrityError

MANIFEST_NAME = "layercollapse_manifest.json"
#: Files a model save owns: the previous save's versions are never carried into a new one.
WEIGHT_PATTERNS = (r"model(-\d+-of-\d+)?\.safetensors", r"model\.safetensors\.index\.json", r"pytorch_model.*\.bin.*",
                   r"config\.json", r"generation_config\.json", re.escape(MANIFEST_NAME))
_WEIGHTS = re.compile(r"(model.*\.safetensors|model\.safetensors\.index\.json|pytorch_model.*"
                      r"|collapse_plan\.safetensors)$")
_TMP = re.compile(r"^\.(?P<name>.+)\.layercollapse-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
_ACTIVE: set[Path] = set()


def _owned(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    compiled = [re.compile(p + "$") for p in patterns]
    return lambda name: any(p.match(name) for p in compiled)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> None:
    """Remove the temporary folders beside ``target`` left by saves whose process died, and put back an old folder
    that a dead process had moved aside (the two-rename exchange) when ``target`` is missing."""
    parent = target.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        match = _TMP.match(entry.name)
        if not match or match["name"] != target.name or entry in _ACTIVE or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not target.exists():
            entry.rename(target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``); ``False`` when the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """``layercollapse_manifest.json``: every file of ``folder`` (but the manifest) with its size and SHA-256."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps({"format": 1, "files": files}, indent=2, sort_keys=True) + "\n")
    return path


def verify_manifest(folder: str | os.PathLike) -> bool:
    """Check a local folder against its manifest (``False`` when it has none, e.g. written by hf_layercollapse 0.1);
    raise :class:`~hf_layercollapse.errors.CheckpointIntegrityError` naming the file for a missing or changed file, or
    a weight file the manifest does not list."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointIntegrityError(f"{path} is not a readable manifest ({err}): the checkpoint is corrupt; save "
                                       "or download it again.") from None
    for name, expected in files.items():
        if not _WEIGHTS.match(Path(name).name):  # the config, the tokenizer, a README may be edited freely
            continue
        file = folder / name
        if not file.is_file():
            raise CheckpointIntegrityError(f"{file} is missing from the checkpoint (its manifest lists it): the "
                                           "checkpoint is incomplete; save or download it again.")
        if file.stat().st_size != expected.get("size") or file_digest(file) != expected.get("sha256"):
            raise CheckpointIntegrityError(f"{file} is not the file this checkpoint was saved with (its size or "
                                           "SHA-256 differs from the manifest): it was edited, truncated or mixed "
                                           "with another save; save or download the checkpoint again.")
    stray = sorted(p.name for p in folder.iterdir() if p.is_file() and _WEIGHTS.match(p.name) and p.name not in files)
    if stray:
        raise CheckpointIntegrityError(f"{folder} holds weight files that are not part of its checkpoint: {stray} "
                                       "(left by another save); remove them, or save the model again.")
    return True


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, owned: tuple[str, ...] = WEIGHT_PATTERNS,
                  manifest: bool = True) -> Iterator[Path]:
    """Yield a fresh folder to save into; on success it becomes ``target`` in one step (see the module docstring).
    Files of the old ``target`` that do not match ``owned`` are carried over; ``manifest`` writes the manifest."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory.")
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.parent / f".{target.name}.layercollapse-tmp-{token}"
    tmp.mkdir()
    _ACTIVE.add(tmp)
    try:
        yield tmp
        if target.is_dir():
            is_owned = _owned(owned)
            for entry in target.iterdir():
                dest = tmp / entry.name
                if is_owned(entry.name) or dest.exists() or _TMP.match(entry.name):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, dest)
                else:
                    try:
                        os.link(entry, dest)
                    except OSError:
                        shutil.copy2(entry, dest)
        if manifest:
            write_manifest(tmp)
        if not target.exists():
            tmp.rename(target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = target.parent / f".{target.name}.layercollapse-old-{token}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        _ACTIVE.discard(tmp)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
