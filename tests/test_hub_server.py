"""The test Hub server against the REAL huggingface_hub / transformers clients over real HTTP.

Client code runs in subprocesses (see ``tests/hub_server.py`` for why); the server runs here.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

if str(Path(__file__).parent) not in sys.path:  # robust to --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))

from hub_server import HubServer, run_with_hub

TOKEN = "hf_test_write_0123456789"
OTHER_TOKEN = "hf_test_bob_9876543210"
REPO = "alice/tiny-model"
README = """---
license: apache-2.0
library_name: transformers
tags:
- layercollapse
- test
---
# Tiny model

Used by tests only.
"""


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer(tokens={TOKEN: "alice", OTHER_TOKEN: "bob"}) as server:
        yield server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("model")
    gen = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(512, 1024, generator=gen), "b": torch.randn(16, generator=gen)},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}, indent=2))
    (d / "README.md").write_text(README)
    return d


def _last_json(proc: Any) -> dict[str, Any]:
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def uploaded(hub: HubServer, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """create_repo → upload_folder → model_info → snapshot/hf_hub_download → upload again."""
    code = f"""
        import json
        from huggingface_hub import HfApi, snapshot_download, hf_hub_download, model_info
        api = HfApi()
        url = api.create_repo({REPO!r})
        api.create_repo({REPO!r}, exist_ok=True)
        first = api.upload_folder(repo_id={REPO!r}, folder_path={str(model_dir)!r}, commit_message="add model")
        info = model_info({REPO!r}, files_metadata=True)
        snap = snapshot_download({REPO!r})
        one = hf_hub_download({REPO!r}, "config.json")
        second = api.upload_folder(repo_id={REPO!r}, folder_path={str(model_dir)!r})
        print(json.dumps({{"url": str(url), "first": first.oid, "second": second.oid, "sha": info.sha,
            "siblings": {{s.rfilename: [s.size, s.lfs is not None] for s in info.siblings}},
            "card": info.card_data.to_dict(), "tags": info.tags, "private": info.private,
            "snapshot": snap, "one": one, "commit_url": first.commit_url}}))
    """
    n_put_before = sum(r.method == "PUT" for r in hub.requests)
    result = _last_json(run_with_hub(code, hub, token=TOKEN, tmp_path=tmp_path_factory.mktemp("client")))
    result["n_put"] = sum(r.method == "PUT" for r in hub.requests) - n_put_before
    return result


def test_create_and_upload_one_commit(hub: HubServer, uploaded: dict[str, Any]) -> None:
    assert uploaded["url"] == f"{hub.url}/{REPO}"
    repo = hub.repos[("model", REPO)]
    assert len(repo.commits) == 2  # initial .gitattributes commit + ONE upload commit
    assert repo.refs["main"] == uploaded["first"] == uploaded["sha"]
    assert repo.commits[uploaded["first"]].title == "add model"
    assert uploaded["commit_url"].endswith(f"/{REPO}/commit/{uploaded['first']}")
    assert hub.repos[("model", REPO)].commits[uploaded["first"]].files["model.safetensors"].lfs
    assert not hub.repos[("model", REPO)].commits[uploaded["first"]].files["config.json"].lfs


def test_model_info(uploaded: dict[str, Any], model_dir: Path) -> None:
    sib = uploaded["siblings"]
    assert set(sib) == {".gitattributes", "README.md", "config.json", "model.safetensors"}
    assert sib["model.safetensors"] == [(model_dir / "model.safetensors").stat().st_size, True]
    assert sib["config.json"][1] is False
    assert len(uploaded["sha"]) == 40 and int(uploaded["sha"], 16) >= 0
    assert uploaded["card"]["license"] == "apache-2.0"
    assert uploaded["card"]["tags"] == ["layercollapse", "test"]
    assert {"layercollapse", "transformers", "license:apache-2.0"} <= set(uploaded["tags"])
    assert uploaded["private"] is False


def test_downloads_are_byte_identical(uploaded: dict[str, Any], model_dir: Path) -> None:
    snap = Path(uploaded["snapshot"])
    assert snap.name == uploaded["sha"]
    assert {p.name for p in snap.iterdir()} == {".gitattributes", "README.md", "config.json", "model.safetensors"}
    for f in model_dir.iterdir():
        assert (snap / f.name).read_bytes() == f.read_bytes(), f.name
    assert Path(uploaded["one"]).read_bytes() == (model_dir / "config.json").read_bytes()


def test_second_upload_is_idempotent(hub: HubServer, uploaded: dict[str, Any]) -> None:
    assert uploaded["second"] == uploaded["first"]  # nothing changed → no new commit
    assert len(hub.repos[("model", REPO)].commits) == 2
    assert uploaded["n_put"] == 1  # the LFS object was PUT once only


def test_token_never_stored_or_sent_in_a_body(hub: HubServer, uploaded: dict[str, Any]) -> None:
    blobs = list(hub.stored_blobs())
    assert len(blobs) >= 4
    assert all(TOKEN.encode() not in b for b in blobs)
    assert all(TOKEN.encode() not in r.body for r in hub.requests)
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)


def test_wrong_token_is_rejected(hub: HubServer, uploaded: dict[str, Any], tmp_path: Path) -> None:
    code = f"""
        from huggingface_hub import HfApi
        HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id={REPO!r})
    """
    proc = run_with_hub(code, hub, token="hf_not_a_valid_token", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "HfHubHTTPError" in proc.stderr and "401" in proc.stderr
    assert "Invalid credentials" in proc.stderr
    assert "x.txt" not in hub.files(REPO)


def test_no_token_is_refused(hub: HubServer, uploaded: dict[str, Any], tmp_path: Path) -> None:
    code = f"""
        from huggingface_hub import HfApi
        api = HfApi()
        try:
            api.create_repo("alice/other")
        except Exception as e:
            print("create:", type(e).__name__, e)
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id={REPO!r})
    """
    proc = run_with_hub(code, hub, token=None, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "create: HfHubHTTPError" in proc.stdout and "401" in proc.stdout
    assert "401" in proc.stderr and "Unauthorized" in proc.stderr
    assert ("model", "alice/other") not in hub.repos and "x.txt" not in hub.files(REPO)


def test_private_repo_needs_token(hub: HubServer, tmp_path: Path) -> None:
    code = f"""
        from huggingface_hub import HfApi, hf_hub_download, model_info
        from huggingface_hub.errors import RepositoryNotFoundError
        HfApi().create_repo("alice/secret", private=True, token={TOKEN!r})
        HfApi().upload_file(path_or_fileobj=b"hidden", path_in_repo="a.txt", repo_id="alice/secret",
                            token={TOKEN!r})
        print(model_info("alice/secret", token={TOKEN!r}).private)
        for call in (lambda: model_info("alice/secret"), lambda: hf_hub_download("alice/secret", "a.txt"),
                     lambda: model_info("alice/secret", token={OTHER_TOKEN!r})):
            try:
                call()
                print("READABLE")
            except RepositoryNotFoundError as e:
                print("refused", e.response.status_code)
    """
    proc = run_with_hub(code, hub, token=None, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["True", "refused 401", "refused 401", "refused 404"]
    assert hub.files("alice/secret")["a.txt"] == b"hidden"


def test_more_client_calls(hub: HubServer, tmp_path: Path) -> None:
    code = """
        import json
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError, HfHubHTTPError
        api, repo, out = HfApi(), "alice/extras", {}
        api.create_repo(repo)
        try:
            api.create_repo(repo)
        except HfHubHTTPError as e:
            out["dup"] = e.response.status_code
        api.upload_file(path_or_fileobj=b"a", path_in_repo="sub/dir/a.txt", repo_id=repo)
        api.upload_file(path_or_fileobj=b"b", path_in_repo="sub/b.txt", repo_id=repo)
        pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id=repo, create_pr=True)
        out["pr"] = [pr.pr_revision, pr.pr_num]
        out["pr_file"] = open(hf_hub_download(repo, "pr.txt", revision=pr.pr_revision)).read()
        out["main_has_pr"] = api.file_exists(repo, "pr.txt")
        out["tree"] = sorted(e.path for e in api.list_repo_tree(repo, recursive=True))
        out["top"] = sorted(e.path for e in api.list_repo_tree(repo))
        out["info"] = sorted(e.path for e in api.get_paths_info(repo, ["sub", "sub/b.txt", "nope"]))
        api.delete_folder("sub/dir", repo_id=repo)
        api.delete_file("sub/b.txt", repo_id=repo)
        out["after"] = sorted(api.list_repo_files(repo))
        for name, call in [("entry", lambda: hf_hub_download(repo, "nope.txt")),
                           ("rev", lambda: hf_hub_download(repo, "pr.txt", revision="nobranch"))]:
            try:
                call()
            except (EntryNotFoundError, RevisionNotFoundError) as e:
                out[name] = type(e).__name__
        out["whoami"] = api.whoami()["name"]
        api.create_repo("alice/data", repo_type="dataset")
        api.upload_file(path_or_fileobj=b"a,b\\n1,2\\n", path_in_repo="data/train.csv", repo_id="alice/data",
                        repo_type="dataset")
        snap = snapshot_download("alice/data", repo_type="dataset")
        out["dataset"] = open(snap + "/data/train.csv").read()
        out["refs"] = [b.name for b in api.list_repo_refs(repo, include_pull_requests=True).branches]
        api.delete_repo(repo)
        out["exists"] = api.repo_exists(repo)
        print(json.dumps(out))
    """
    out = _last_json(run_with_hub(code, hub, token=TOKEN, tmp_path=tmp_path))
    assert out["dup"] == 409
    assert out["pr"] == ["refs/pr/1", 1] and out["pr_file"] == "pr" and out["main_has_pr"] is False
    assert out["tree"] == [".gitattributes", "sub", "sub/b.txt", "sub/dir", "sub/dir/a.txt"]
    assert out["top"] == [".gitattributes", "sub"]
    assert out["info"] == ["sub", "sub/b.txt"]
    assert out["after"] == [".gitattributes"]
    assert out["entry"] == "RemoteEntryNotFoundError" and out["rev"] == "RevisionNotFoundError"
    assert out["whoami"] == "alice" and out["exists"] is False
    assert out["dataset"] == "a,b\n1,2\n" and out["refs"] == ["main"]
    assert all(r.status < 500 for r in hub.requests)


def test_range_and_head(hub: HubServer) -> None:
    hub.add_repo("alice/ranged", {"data.bin": bytes(range(256)) * 4})
    url = f"{hub.url}/alice/ranged/resolve/main/data.bin"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=10-19"})) as r:
        assert r.status == 206 and r.read() == bytes(range(10, 20))
        assert r.headers["Content-Range"] == "bytes 10-19/1024"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as r:
        assert r.headers["X-Linked-Size"] == "1024" and len(r.headers["X-Repo-Commit"]) == 40


def test_chunked_lfs_put_and_raw_401(hub: HubServer) -> None:
    body = b"chunked-payload" * 1000
    oid = hashlib.sha256(body).hexdigest()
    hub.add_repo("alice/raw")
    batch = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": len(body)}]}).encode()
    url = f"{hub.url}/alice/raw.git/info/lfs/objects/batch"
    with pytest.raises(urllib.error.HTTPError) as err:  # no token: 401 with a JSON error body
        urllib.request.urlopen(urllib.request.Request(url, data=batch, method="POST"))
    assert err.value.code == 401 and "token" in json.loads(err.value.read())["error"]
    req = urllib.request.Request(url, data=batch, method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req) as r:
        href = urlsplit(json.load(r)["objects"][0]["actions"]["upload"]["href"])
    conn = http.client.HTTPConnection(href.netloc, timeout=10)
    conn.request("PUT", href.path, body=iter([body[:5000], body[5000:]]), encode_chunked=True)
    assert conn.getresponse().status == 200
    conn.close()
    assert hub.requests[-1].headers["transfer-encoding"] == "chunked"
    assert hub.lfs_objects[oid] == body


def test_transformers_autoconfig_from_hub(hub: HubServer, tmp_path: Path) -> None:
    code = """
        from huggingface_hub import HfApi
        from transformers import AutoConfig, BertConfig
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                   vocab_size=99).save_pretrained("cfg")
        HfApi().create_repo("alice/tiny-bert")
        HfApi().upload_folder(repo_id="alice/tiny-bert", folder_path="cfg")
        cfg = AutoConfig.from_pretrained("alice/tiny-bert")
        print(type(cfg).__name__, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)
    """
    proc = run_with_hub(code, hub, token=TOKEN, tmp_path=tmp_path, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "BertConfig 32 37 99"
