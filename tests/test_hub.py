"""``push_to_hub`` / pulling / ``hf-layercollapse push`` against the REAL huggingface_hub client over REAL HTTP.

The Hub is :class:`hub_server.HubServer` in this process (token checking on); the client runs in ONE subprocess
(see ``tests/hub_server.py`` for why) that pushes, pushes again, reads the card, downloads and loads the model,
tries a wrong token and runs the CLI, then prints a JSON summary that the tests below check.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).parent) not in sys.path:  # robust to --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))

from hub_server import HubServer, run_with_hub

TESTS = Path(__file__).parent
TOKEN = "hf_layercollapse_test_token_5f2c9a"
WRONG = "hf_wrong_token_0000"
REPO, CLI_REPO, PRIVATE_REPO, BASE = "alice/tiny-collapsed", "alice/tiny-cli", "alice/tiny-private", "alice/tiny-base"

CLIENT = """
import contextlib, io, json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
import hf_layercollapse as hlc
from hf_layercollapse.cli import main
from hf_layercollapse.hub import push_to_hub, save_for_hub
from huggingface_hub import HfApi, ModelCard, snapshot_download
from transformers import AutoModel, BertTokenizer
from helpers import tiny_model

Path("vocab.txt").write_text("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
tokenizer = BertTokenizer("vocab.txt")
model = hlc.get_collapse_model(tiny_model("bert"))
hlc.injected_activations(model)["encoder.layer.1"].alpha.data.fill_(1.0)
report = hlc.collapse_model(model)
options = dict(report=report, base_model={base!r}, datasets=["alice/tweets"], training_info={{"steps": 100}},
               eval_results={{"task_type": "text-classification", "dataset_type": "tweets", "dataset_name": "Tweets",
                             "metrics": {{"accuracy": {{"before": 0.93, "after": 0.91}}}}}})
out = {{}}
first = push_to_hub(model, {repo!r}, tokenizer, **options)
second = push_to_hub(model, {repo!r}, tokenizer, **options)
pr = push_to_hub(model, {repo!r}, tokenizer, create_pr=True, **dict(options, training_info={{"steps": 200}}))
out["commits"] = [first.oid, second.oid, pr.pr_revision]
save_for_hub(model, "local", tokenizer, repo_id={repo!r}, **options)
card = ModelCard.load({repo!r})
out["card"] = card.data.to_dict()
out["eval"] = sorted([e.metric_name, e.metric_value] for e in card.data.eval_results)
out["readme"] = card.text
snapshot = Path(snapshot_download({repo!r}))
out["files"] = sorted(p.name for p in snapshot.iterdir())
out["identical"] = {{p.name: p.read_bytes() == (snapshot / p.name).read_bytes() for p in Path("local").iterdir()}}
out["report"] = json.loads((snapshot / "layercollapse_report.json").read_text()) == report.to_dict()
pulled = AutoModel.from_pretrained({repo!r})
ids = torch.tensor([[2, 5, 6, 3]])
with torch.no_grad():
    out["allclose"] = torch.allclose(pulled(ids).last_hidden_state, model(ids).last_hidden_state, atol=1e-6)
out["params_in_memory"] = sum(p.numel() for p in model.parameters())
out["pulled"] = [type(pulled.encoder.layer[1].intermediate.dense).__name__,
                 list(hlc.injected_activations(pulled)), sum(p.numel() for p in pulled.parameters())]
try:
    push_to_hub(model, {repo!r}, token={wrong!r})
except PermissionError as err:
    out["wrong_token"] = str(err)
push_to_hub(model, {private!r}, private=True, report=report)
token = os.environ.pop("HF_TOKEN")
try:
    push_to_hub(model, {repo!r})
except PermissionError as err:
    out["no_token"] = str(err)
os.environ["HF_TOKEN"] = token
stdout, stderr = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    out["cli_push"] = main(["push", "local", {cli_repo!r}, "--base-model", {base!r}, "--tag", "demo"])
    out["cli_wrong"] = main(["push", "local", {cli_repo!r}, "--token", {wrong!r}])
    out["cli_inspect"] = main(["inspect", {repo!r}, "--json"])
out["cli_stdout"], out["cli_stderr"] = stdout.getvalue(), stderr.getvalue()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer(tokens={TOKEN: "alice", "hf_bob_token": "bob"}) as server:
        server.add_repo(BASE, {"README.md": b"---\nlicense: mit\nlibrary_name: transformers\n---\n# Base model\n"})
        yield server


@pytest.fixture(scope="module")
def client(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    code = CLIENT.format(tests=str(TESTS), repo=REPO, cli_repo=CLI_REPO, private=PRIVATE_REPO, base=BASE,
                         wrong=WRONG)
    proc = run_with_hub(code, hub, token=TOKEN, tmp_path=tmp_path_factory.mktemp("client"), timeout=240)
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output"] = proc.stdout + proc.stderr
    return result


def test_push_is_one_commit_with_every_file(hub: HubServer, client: dict[str, Any]) -> None:
    repo = hub.repos[("model", REPO)]
    first = repo.commits[client["commits"][0]]
    assert first.parent is not None and repo.commits[first.parent].title == "initial commit"
    assert first.title.startswith("Upload LayerCollapse model (1 collapsed blocks")
    assert set(first.files) == {".gitattributes", "README.md", "config.json", "model.safetensors", "tokenizer.json",
                                "layercollapse_manifest.json",
                                "tokenizer_config.json", "layercollapse_report.json", "layercollapse_chart.png"}
    assert first.files["model.safetensors"].lfs and first.files["layercollapse_chart.png"].lfs
    assert json.loads(first.files["config.json"].data)["model_type"] == "hf_layercollapse"


def test_second_push_creates_no_commit(hub: HubServer, client: dict[str, Any]) -> None:
    first, second, pr_revision = client["commits"]
    repo = hub.repos[("model", REPO)]
    assert second == first == repo.refs["main"]  # identical bytes → huggingface_hub skips the commit
    assert len(repo.commits) == 3  # initial commit, the first push, the pull request below
    # the create_pr push (card changed: training steps) went to a PR, not to main
    assert pr_revision == "refs/pr/1"
    pr_files, main_files = hub.files(REPO, "refs/pr/1"), hub.files(REPO)
    assert [p for p in pr_files if pr_files[p] != main_files.get(p)] == ["README.md"]
    assert b"| steps | 200 |" in pr_files["README.md"] and b"| steps | 100 |" in main_files["README.md"]


def test_card_metadata(client: dict[str, Any]) -> None:
    card = client["card"]
    assert card["library_name"] == "transformers"
    assert {"layercollapse", "pruning", "compression", "bert"} <= set(card["tags"])
    assert card["base_model"] == BASE
    assert card["license"] == "mit"  # inherited from the base model's card on the Hub
    assert card["datasets"] == ["alice/tweets"] and card["pipeline_tag"] == "feature-extraction"
    assert card["model-index"][0]["name"] == "tiny-collapsed"
    assert client["eval"] == [["accuracy", 0.91], ["accuracy (before LayerCollapse)", 0.93]]


def test_card_body(client: dict[str, Any]) -> None:
    text = client["readme"]
    assert "# tiny-collapsed" in text and f"[{BASE}](https://huggingface.co/{BASE})" in text
    assert "| `encoder.layer.1` | plain | 1.0000 | collapsed | 4,192 → 1,056 |" in text
    assert "| `encoder.layer.0` | plain | 0.0000 | kept" in text
    assert "| parameters | 23,488 | 20,352 | -13.35% |" in text
    assert "![α per MLP block" in text and "(layercollapse_chart.png)" in text
    assert "| Tweets | accuracy | 0.93 | 0.91 | -0.02 |" in text
    assert "import hf_layercollapse" in text and f'AutoModel.from_pretrained("{REPO}")' in text
    assert "pip install hf-layercollapse" in text and "| steps | 100 |" in text
    assert "2311.17943" in text and "Koushanfar" in text


def test_download_is_byte_identical_to_local_save(client: dict[str, Any]) -> None:
    assert client["files"] == sorted([".gitattributes", *client["identical"]])
    assert all(client["identical"].values()), client["identical"]
    assert client["report"]


def test_pull_rebuilds_collapsed_model(client: dict[str, Any]) -> None:
    merged, injected, num_params = client["pulled"]
    assert client["allclose"]
    assert merged == "Identity" and injected == ["encoder.layer.0"]
    assert num_params == client["params_in_memory"]


def test_wrong_token_is_refused(hub: HubServer, client: dict[str, Any]) -> None:
    message = client["wrong_token"]
    assert "refused the token" in message and "401" in message and REPO in message
    assert WRONG not in message
    assert "refused the token" in client["cli_stderr"] and client["cli_wrong"] == 1
    assert "Traceback" not in client["cli_stderr"]
    assert "needs a Hub token" in client["no_token"] and "HF_TOKEN" in client["no_token"]


def test_private_push_and_cli(hub: HubServer, client: dict[str, Any]) -> None:
    assert hub.repos[("model", PRIVATE_REPO)].private is True
    assert client["cli_push"] == 0
    files = hub.files(CLI_REPO)
    assert {"model.safetensors", "tokenizer.json", "README.md", "layercollapse_report.json"} <= set(files)
    assert b"- demo" in files["README.md"] and b"license: mit" in files["README.md"]
    assert f"/{CLI_REPO}/commit/" in client["cli_stdout"]
    inspected = json.loads(client["cli_stdout"][client["cli_stdout"].index("{"):])
    assert [(b["name"], b["state"]) for b in inspected["blocks"]] == [("encoder.layer.0", "injected"),
                                                                     ("encoder.layer.1", "collapsed")]


def test_token_is_nowhere(hub: HubServer, client: dict[str, Any]) -> None:
    blobs = list(hub.stored_blobs())
    assert len(blobs) > 10
    for secret in (TOKEN.encode(), WRONG.encode()):
        assert not any(secret in blob for blob in blobs)
        assert not any(secret in r.body for r in hub.requests)
        assert secret.decode() not in client["output"]
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
