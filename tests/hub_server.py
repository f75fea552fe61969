"""A small Hugging Face Hub-compatible HTTP server for tests (the huggingface_hub 2.4 surface).

In memory: repo create/delete, whoami-v2, validate-yaml, preupload, LFS batch + PUT (chunked too) +
verify, ndjson commits (``create_pr`` → ``refs/pr/N``), model/dataset info (cardData from README.md),
tree, paths-info, refs and resolve (HEAD/GET, Range), with the real Hub's ``X-Error-Code`` values.
Writes need ``Authorization: Bearer <token>`` for a token given to the constructor; private repos
are readable only with one. Every request is kept in ``server.requests``.

Pattern: the server runs in a daemon thread of the pytest process and the client runs in a
SUBPROCESS (:func:`run_with_hub`). huggingface_hub reads ``HF_ENDPOINT``/``HF_HOME``/
``HF_HUB_DISABLE_XET`` once at import, the port is known only after binding port 0, and any earlier
import in the test session would freeze the real endpoint; a subprocess gets a clean environment
(no stored token or user cache, xet off so uploads take the LFS path served here)::

    with HubServer(tokens={"hf_test_write": "alice"}) as hub:
        proc = run_with_hub("from huggingface_hub import whoami; print(whoami()['name'])",
                            hub, token="hf_test_write", tmp_path=tmp_path)
        assert proc.stdout.strip() == "alice"
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".npy",
                ".npz", ".pkl", ".gguf", ".png", ".jpg", ".jpeg", ".parquet", ".arrow", ".zip", ".gz")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_T = r"(?P<t>models|datasets|spaces)"
_R = r"(?P<repo>[^/]+/[^/]+)"
_P = r"(?P<pfx>datasets/|spaces/)?"
ROUTES: list[tuple[str, str, str]] = [
    ("POST", r"/api/repos/create", "create"),
    ("DELETE", r"/api/repos/delete", "delete"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/{_T}/{_R}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/{_T}/{_R}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/{_T}/{_R}(?:/revision/(?P<rev>[^/]+))?", "info"),
    ("GET", rf"/api/{_T}/{_R}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/api/{_T}/{_R}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", rf"/api/{_T}/{_R}/refs", "refs"),
    ("POST", rf"/{_P}{_R}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})/(?P<nonce>[0-9a-f]+)", "lfs_put"),
    ("POST", r"/lfs-verify/(?P<oid>[0-9a-f]{64})", "lfs_verify"),
    ("GET|HEAD", rf"/{_P}{_R}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data`` as a blob (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


@dataclass
class Blob:
    """File content stored in a commit; ``lfs`` files are exposed through LFS pointers."""

    data: bytes
    lfs: bool = False

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                        f"size {len(self.data)}\n").encode()
        self.oid = git_blob_sha1(self.pointer if self.lfs else self.data)
        self.etag = self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    """An immutable snapshot of a repo: ``files`` maps path → :class:`Blob`."""

    oid: str
    parent: str | None
    title: str
    date: float
    files: dict[str, Blob]


@dataclass
class Repo:
    """A repo: ``refs`` maps ``main`` / ``refs/pr/N`` to commit oids."""

    repo_type: str
    repo_id: str
    private: bool
    created: float = field(default_factory=time.time)
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    n_prs: int = 0


@dataclass
class RecordedRequest:
    """One request: path with query, headers (names lower-cased), de-chunked body, status answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query, keep_blank_values=True)

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e


_Req = RecordedRequest
_Resp = tuple[int, dict[str, str], bytes]


class HubError(Exception):
    """An HTTP error answered as JSON ``{"error": message}`` plus X-Error-Code/X-Error-Message."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}

    def response(self) -> _Resp:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _json({"error": self.message, **self.extra}, self.status, headers)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None,
          ctype: str = "application/json") -> _Resp:
    return status, {"Content-Type": ctype, **(headers or {})}, json.dumps(obj).encode()


def _front_matter(text: str) -> dict[str, Any] | None:
    """Parse the YAML metadata block at the top of a README.md (``None`` when absent)."""
    m = re.match(r"^\s*---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m:
        return None
    data = yaml.safe_load(m.group(1))
    return data if isinstance(data, dict) else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _dispatch(self) -> None:
        body, url = self._read_body(), urlsplit(self.path)
        hub = self.server.hub
        record = RecordedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        hub.requests.append(record)
        status, headers, payload = 404, {}, b""
        for methods, pattern, name in ROUTES:
            m = re.fullmatch(pattern, url.path)
            if m and self.command in methods.split("|"):
                params = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                try:
                    with hub.lock:
                        status, headers, payload = getattr(hub, f"_h_{name}")(record, **params)
                except HubError as e:
                    status, headers, payload = e.response()
                except Exception as e:  # surface bugs as 500 and keep serving
                    status, headers, payload = HubError(500, f"{type(e).__name__}: {e}").response()
                break
        else:
            status, headers, payload = HubError(404, f"Not found: {self.command} {url.path}").response()
        record.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class HubServer:
    """In-memory Hub on ``127.0.0.1:<random port>``; ``tokens`` maps token → username.

    A user may write to its own namespace and to the namespaces in ``orgs[username]``.
    Files whose name ends with an :data:`LFS_SUFFIXES` suffix, that are ``>= lfs_threshold``
    bytes, or whose first 512 bytes hold a NUL byte are uploaded through LFS.
    """

    def __init__(self, tokens: Mapping[str, str] | None = None, *,
                 orgs: Mapping[str, Iterable[str]] | None = None, lfs_threshold: int = 10 * 2**20) -> None:
        self.tokens = dict(tokens or {})
        self.orgs = {user: set(names) for user, names in (orgs or {}).items()}
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[RecordedRequest] = []
        self.lock = threading.RLock()
        self._pending: dict[str, tuple[str, int]] = {}
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        """Bind port 0 on 127.0.0.1 and serve in a daemon thread."""
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def url(self) -> str:
        """Base URL to use as ``HF_ENDPOINT`` (no trailing slash)."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_repo(self, repo_id: str, files: Mapping[str, bytes] | None = None, *, repo_type: str = "model",
                 private: bool = False) -> str:
        """Create a repo without HTTP, optionally with one commit of ``files``; returns head oid."""
        with self.lock:
            repo = self._new_repo(repo_type, repo_id, private)
            if files:
                self._commit(repo, "main", "Seed files", {
                    p: Blob(d, self._is_lfs(p, len(d), d[:512])) for p, d in files.items()})
            return repo.refs["main"]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Contents of every file of ``repo_id`` at ``revision``."""
        with self.lock:
            repo = self._repo(repo_type, repo_id, None)
            return {p: b.data for p, b in self._resolve(repo, revision).files.items()}

    def stored_blobs(self) -> Iterator[bytes]:
        """Every stored byte string: files of every commit of every repo and all LFS objects."""
        with self.lock:
            blobs = [b.data for r in self.repos.values() for c in r.commits.values() for b in c.files.values()]
        yield from [*blobs, *self.lfs_objects.values()]

    def _user(self, req: _Req) -> str | None:
        auth = req.headers.get("authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _can_write(self, user: str, namespace: str) -> bool:
        return namespace == user or namespace in self.orgs.get(user, set())

    def _writer(self, req: _Req, namespace: str) -> str:
        user = self._user(req)
        if user is None:
            raise HubError(401, "Unauthorized: a valid token is required for write operations (401)")
        if not self._can_write(user, namespace):
            raise HubError(403, f"You don't have the rights to write to {namespace}")
        return user

    def _repo(self, repo_type: str, repo_id: str, req: _Req | None, write: bool = False) -> Repo:
        ns = repo_id.split("/")[0]
        user = self._writer(req, ns) if write and req else (self._user(req) if req else None)
        repo = self.repos.get((repo_type, repo_id))
        if repo is not None and req is not None and repo.private and not (user and self._can_write(user, ns)):
            repo = None  # the real Hub hides private repos: 401 without a token, 404 with another one's
            if user is None:
                raise HubError(401, "Repository not found", "RepoNotFound")
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        oid = repo.refs.get(rev) or repo.refs.get(rev.removeprefix("refs/heads/"))
        if oid is None and rev in repo.commits:
            oid = rev
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[oid]

    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo: {repo_id}",
                           extra={"url": f"{self.url}/{_PREFIX[repo_type]}{repo_id}"})
        repo = self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private)
        self._commit(repo, None, "initial commit", {".gitattributes": Blob(GITATTRIBUTES)})
        return repo

    def _commit(self, repo: Repo, ref: str | None, title: str, files: dict[str, Blob]) -> Commit:
        parent = repo.refs.get(ref or "main")
        oid = hashlib.sha1(f"{parent}{time.time_ns()}{secrets.token_hex(8)}".encode()).hexdigest()
        commit = repo.commits[oid] = Commit(oid, parent, title, time.time(), files)
        repo.refs[ref or "main"] = oid
        return commit

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return path.lower().endswith(LFS_SUFFIXES) or size >= self.lfs_threshold or b"\0" in sample

    @staticmethod
    def _file_entry(path: str, blob: Blob) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
        return entry

    @staticmethod
    def _dir_entry(path: str, commit: Commit) -> dict[str, Any]:
        listing = "".join(f"{p}:{b.oid}\n" for p, b in sorted(commit.files.items()) if p.startswith(path + "/"))
        return {"type": "directory", "oid": git_blob_sha1(listing.encode()), "size": 0, "path": path}

    def _h_create(self, req: _Req) -> _Resp:
        data = req.json()
        ns = data.get("organization") or self._user(req) or ""
        self._writer(req, ns)
        repo_type = data.get("type") or "model"
        private = data.get("visibility") == "private" or bool(data.get("private"))
        repo = self._new_repo(repo_type, f"{ns}/{data['name']}", private)
        return _json({"url": f"{self.url}/{_PREFIX[repo_type]}{repo.repo_id}", "name": repo.repo_id})

    def _h_delete(self, req: _Req) -> _Resp:
        data = req.json()
        ns = data.get("organization") or self._user(req) or ""
        repo = self._repo(data.get("type") or "model", f"{ns}/{data['name']}", req, write=True)
        del self.repos[(repo.repo_type, repo.repo_id)]
        return _json({})

    def _h_whoami(self, req: _Req) -> _Resp:
        user = self._user(req)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return _json({"type": "user", "id": user, "name": user, "fullname": user,
                      "orgs": [{"type": "org", "name": o} for o in sorted(self.orgs.get(user, ()))],
                      "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def _h_validate_yaml(self, req: _Req) -> _Resp:
        try:
            _front_matter(req.json().get("content") or "")
        except yaml.YAMLError as e:
            raise HubError(400, f"Invalid YAML metadata: {e}") from e
        return _json({"errors": [], "warnings": []})

    def _h_preupload(self, req: _Req, t: str, repo: str, rev: str) -> _Resp:
        head = self._resolve(self._repo(_TYPES[t], repo, req, write=True), rev)
        out = []
        for f in req.json().get("files", []):
            lfs = self._is_lfs(f["path"], int(f["size"]), base64.b64decode(f.get("sample") or ""))
            old = head.files.get(f["path"])
            oid = None if old is None else (old.sha256 if lfs else git_blob_sha1(old.data))
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False, "oid": oid})
        return _json({"files": out, "commitOid": head.oid})

    def _h_lfs_batch(self, req: _Req, repo: str, pfx: str = "") -> _Resp:
        data = req.json()
        self._repo(_TYPES.get(pfx.rstrip("/"), "model"), repo, req, write=True)
        objects = []
        for obj in data.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if oid in self.lfs_objects:
                objects.append({"oid": oid, "size": size})
                continue
            nonce = secrets.token_hex(16)
            self._pending[nonce] = (oid, size)
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{self.url}/lfs-upload/{oid}/{nonce}"},
                "verify": {"href": f"{self.url}/lfs-verify/{oid}"}}})
        return _json({"transfer": "basic", "objects": objects}, ctype="application/vnd.git-lfs+json")

    def _h_lfs_put(self, req: _Req, oid: str, nonce: str) -> _Resp:
        if self._pending.get(nonce, ("", 0))[0] != oid:
            raise HubError(403, "Unknown or expired upload URL")
        size = self._pending.pop(nonce)[1]
        if len(req.body) != size or hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
        self.lfs_objects[oid] = req.body
        return 200, {}, b""

    def _h_lfs_verify(self, req: _Req, oid: str) -> _Resp:
        if self._user(req) is None:
            raise HubError(401, "Unauthorized: a valid token is required (401)")
        if oid not in self.lfs_objects or len(self.lfs_objects[oid]) != int(req.json().get("size", -1)):
            raise HubError(404, f"LFS object {oid} not found")
        return _json({"oid": oid, "size": len(self.lfs_objects[oid])})

    def _h_commit(self, req: _Req, t: str, repo: str, rev: str) -> _Resp:
        r = self._repo(_TYPES[t], repo, req, write=True)
        lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        base = self._resolve(r, rev)
        ref = rev.removeprefix("refs/heads/")
        pr_url = None
        if req.query.get("create_pr", ["0"])[0] in ("1", "true", "True"):
            r.n_prs += 1
            ref = f"refs/pr/{r.n_prs}"
            r.refs[ref] = base.oid
            pr_url = f"{self.url}/{_PREFIX[r.repo_type]}{r.repo_id}/discussions/{r.n_prs}"
        elif ref not in r.refs:
            raise HubError(400, f"Can only commit to a branch or a pull request ref, not {rev}")
        if header.get("parentCommit") and header["parentCommit"] != base.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for op in lines:
            key, val = op["key"], op["value"]
            if key == "file":
                files[val["path"]] = Blob(base64.b64decode(val["content"]))
            elif key == "lfsFile":
                if val["oid"] not in self.lfs_objects:
                    raise HubError(422, f"LFS object {val['oid']} for {val['path']} was never uploaded")
                files[val["path"]] = Blob(self.lfs_objects[val["oid"]], lfs=True)
            elif key == "deletedFile":
                if files.pop(val["path"], None) is None:
                    raise HubError(404, f"File {val['path']} does not exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = val["path"].rstrip("/") + "/"
                if not [files.pop(p) for p in list(files) if p.startswith(prefix)]:
                    raise HubError(404, f"Folder {val['path']} does not exist", "EntryNotFound")
        commit = self._commit(r, ref, header.get("summary") or "commit", files)
        url = f"{self.url}/{_PREFIX[r.repo_type]}{r.repo_id}/commit/{commit.oid}"
        return _json({"success": True, "commitUrl": url, "commitOid": commit.oid, "pullRequestUrl": pr_url})

    def _h_info(self, req: _Req, t: str, repo: str, rev: str = "main") -> _Resp:
        r = self._repo(_TYPES[t], repo, req)
        commit = self._resolve(r, rev)
        readme = commit.files.get("README.md")
        try:
            card = _front_matter(readme.data.decode()) if readme else None
        except (yaml.YAMLError, UnicodeDecodeError):
            card = None
        tags = list((card or {}).get("tags") or [])
        tags += [x for x in [(card or {}).get("library_name")] if x]
        tags += [f"license:{x}" for x in [(card or {}).get("license")] if x]
        siblings = [{"rfilename": p, "size": len(b.data), "blobId": b.oid,
                     **({"lfs": self._file_entry(p, b)["lfs"] | {"sha256": b.sha256}} if b.lfs else {})}
                    for p, b in sorted(commit.files.items())]
        info = {"_id": hashlib.md5(r.repo_id.encode()).hexdigest()[:24], "id": r.repo_id,
                "modelId": r.repo_id, "author": r.repo_id.split("/")[0], "sha": commit.oid,
                "lastModified": _iso(commit.date), "createdAt": _iso(r.created), "private": r.private,
                "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": tags,
                "siblings": siblings, "usedStorage": sum(len(b.data) for b in commit.files.values())}
        if card is not None:
            info["cardData"] = card
            info.update({k: card[k] for k in ("library_name", "pipeline_tag") if k in card})
        return _json(info)

    def _h_tree(self, req: _Req, t: str, repo: str, rev: str, path: str = "") -> _Resp:
        commit = self._resolve(self._repo(_TYPES[t], repo, req), rev)
        recursive = req.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = path.strip("/")
        prefix = f"{base}/" if base else ""
        files, dirs = [], set()
        for p, blob in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)) if recursive or i == 1)
            if recursive or len(parts) == 1:
                files.append(self._file_entry(p, blob))
        if base and not files and not dirs:
            raise HubError(404, f"Path {base} not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        return _json([self._dir_entry(d, commit) for d in sorted(dirs)] + files)

    def _h_paths_info(self, req: _Req, t: str, repo: str, rev: str) -> _Resp:
        commit = self._resolve(self._repo(_TYPES[t], repo, req), rev)
        form = parse_qs(req.body.decode(), keep_blank_values=True)
        out = []
        for p in form.get("paths", []):
            p = p.strip("/")
            if p in commit.files:
                out.append(self._file_entry(p, commit.files[p]))
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append(self._dir_entry(p, commit))
        return _json(out)

    def _h_refs(self, req: _Req, t: str, repo: str) -> _Resp:
        r = self._repo(_TYPES[t], repo, req)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o}
                    for n, o in r.refs.items() if not n.startswith("refs/")]
        prs = [{"name": n, "ref": n, "targetCommit": o} for n, o in r.refs.items() if n.startswith("refs/pr/")]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _h_resolve(self, req: _Req, repo: str, rev: str, path: str, pfx: str = "") -> _Resp:
        commit = self._resolve(self._repo(_TYPES.get(pfx.rstrip("/"), "model"), repo, req), rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data, size = blob.data, len(blob.data)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.etag}"', "X-Linked-Size": str(size)})
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", req.headers.get("range", "").strip())
        if m and (m.group(1) or m.group(2)):
            start = int(m.group(1)) if m.group(1) else max(0, size - int(m.group(2)))
            end = min(int(m.group(2)), size - 1) if m.group(1) and m.group(2) else size - 1
            if start >= size or start > end:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            data = data[start:end + 1]
            headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(len(data))})
            return 206, headers, data
        return 200, headers, data


def hub_environment(server: HubServer, tmp_path: Path | str, token: str | None = None) -> dict[str, str]:
    """Environment for a client subprocess talking to ``server`` with a fresh ``HF_HOME``.

    Every inherited ``HF_*`` / ``HUGGING_FACE_*`` variable is dropped (no stray token, cache or
    offline flag); ``HF_TOKEN`` is set only when ``token`` is given.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    no_proxy = ",".join(x for x in (env.get("NO_PROXY"), "127.0.0.1,localhost") if x)
    env.update({"HF_ENDPOINT": server.url, "HF_HOME": str(Path(tmp_path) / "hf_home"),
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "NO_PROXY": no_proxy, "no_proxy": no_proxy})
    if token is not None:
        env["HF_TOKEN"] = token
        del env["HF_HUB_DISABLE_IMPLICIT_TOKEN"]
    return env


def run_with_hub(code: str, server: HubServer, token: str | None = None, tmp_path: Path | str | None = None,
                 *, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` (dedented) in a subprocess whose huggingface_hub talks to ``server``.

    ``tmp_path`` is the working directory and holds ``hf_home/`` (a fresh temp dir when ``None``).
    With ``check=True`` a non-zero exit raises ``AssertionError`` showing stdout and stderr.
    """
    tmp = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="hub_client_"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, cwd=tmp, capture_output=True,
                          text=True, timeout=timeout, env=hub_environment(server, tmp, token))
    if check and proc.returncode != 0:
        raise AssertionError(f"client failed ({proc.returncode})\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
    return proc
