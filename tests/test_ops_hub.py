"""ops.hub: the real huggingface_hub client against a stand-in Hub on 127.0.0.1, and the local folder registry.

The same contract tests run on both registries; Hub-only tests cover the optimistic lock (parent_commit), retries
with back-off, and the one-line failure after the retries.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from core.config import default_config  # noqa: E402
from core.paths import Paths  # noqa: E402
from ops.hub import HubConflictError, HubError, HubRegistry, LocalRegistry, Registry, make_registry  # noqa: E402
from tests.standins.hub_server import HubStandIn  # noqa: E402

REPO_ID = "me/btcusd-bot"
V1 = {
    "models/manifest.json": b'{"version": 1}\n',
    "models/signal.joblib": bytes(range(256)) * 40,
    "config.json": b'{"trading": {}}\n',
    "report.md": "# Report\nscore 1.23 \u2192 1.31\n".encode(),
}
V2 = {
    "models/manifest.json": b'{"version": 2}\n',
    "models/position.joblib": b"\x00pos" * 100,
    "config.json": b'{"trading": {"risk_percent": 1.0}}\n',
}
MESSAGE = "run1: score 1.31 vs baseline 1.23 (gate +2% passed)\n\nholdout 0.95, trades 140, max DD 7.5%"


def _folder(base: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return base


def _read(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def hub() -> Iterator[HubStandIn]:
    with HubStandIn() as server:
        yield server


def _hub_registry(hub: HubStandIn, retries: int = 2) -> HubRegistry:
    return HubRegistry(REPO_ID, hub.url, hub.token, private=True, retries=retries, backoff_s=0.01)


@pytest.fixture(params=["local", "hub"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "local":
        yield LocalRegistry(tmp_path / "registry")
    else:
        with HubStandIn() as server:
            yield _hub_registry(server)


# --------------------------------------------------------------------------------------------------- contract
def test_push_tags_fetch_exact_snapshots(registry: Registry, tmp_path: Path) -> None:
    c1 = registry.push(_folder(tmp_path / "v1", V1), MESSAGE, "run1")
    c2 = registry.push(_folder(tmp_path / "v2", V2), "run2: second", "run2")
    assert c1 != c2 and len(c1) == 40
    assert registry.tags() == ["run1", "run2"]
    got1 = registry.fetch("run1", tmp_path / "out1")
    got2 = registry.fetch("run2", tmp_path / "out2")
    assert got1 == tmp_path / "out1"
    assert _read(got1) == V1  # exact bytes, no .gitattributes, no client metadata
    assert _read(got2) == V2  # files absent from the pushed folder are absent from its version
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    assert "***" not in registry.describe() and registry.describe()


def test_repush_same_tag_moves_it(registry: Registry, tmp_path: Path) -> None:
    registry.push(_folder(tmp_path / "v1", V1), MESSAGE, "run1")
    registry.push(_folder(tmp_path / "v2", V2), "run1 again (resumed)", "run1")
    assert registry.tags() == ["run1"]
    assert _read(registry.fetch("run1", tmp_path / "out")) == V2


def test_fetch_errors(registry: Registry, tmp_path: Path) -> None:
    registry.push(_folder(tmp_path / "v1", V1), MESSAGE, "run1")
    with pytest.raises(HubError, match="run9|Revision|revision"):
        registry.fetch("run9", tmp_path / "nope")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(HubError, match="not an empty directory"):
        registry.fetch("run1", busy)
    assert _read(busy) == {"keep.txt": b"x"}
    with pytest.raises(HubError, match="invalid tag"):
        registry.push(tmp_path / "v1", MESSAGE, "../evil")


# --------------------------------------------------------------------------------------------------- Hub only
def test_hub_push_details(hub: HubStandIn, tmp_path: Path) -> None:
    reg = _hub_registry(hub)
    commit = reg.push(_folder(tmp_path / "v1", V1), MESSAGE, "run1")
    repo = hub.repos[REPO_ID]
    assert repo.private
    assert repo.tags == {"run1": commit}
    files = hub.files_at(REPO_ID, "run1")
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == V1
    top = hub.history(REPO_ID)[0]
    assert top.id == commit
    assert top.title == "run1: score 1.31 vs baseline 1.23 (gate +2% passed)"
    assert top.message == "holdout 0.95, trades 140, max DD 7.5%"
    assert top.parent == hub.history(REPO_ID)[1].id  # committed on the head it read
    methods = [r for r in hub.requests if r[0] == "POST"]
    assert ("POST", "/api/repos/create") in methods
    assert any(p.endswith("/preupload/main") for _, p in methods)
    assert any(p.endswith("/commit/main") for _, p in methods)
    assert ("POST", f"/api/models/{REPO_ID}/tag/{commit}") in methods


def test_hub_concurrent_writer_is_refused(hub: HubStandIn, tmp_path: Path) -> None:
    reg = _hub_registry(hub)
    reg.push(_folder(tmp_path / "v1", V1), MESSAGE, "run1")
    # another writer commits after we read the head and before our commit arrives
    hub.on_commit = lambda: hub.external_commit(REPO_ID, {"other.txt": b"theirs"}, "someone else")
    with pytest.raises(HubConflictError, match="someone else committed"):
        reg.push(_folder(tmp_path / "v2", V2), "run2", "run2")
    assert hub.history(REPO_ID)[0].title == "someone else"
    assert "models/position.joblib" not in hub.files_at(REPO_ID)  # none of our files landed
    assert hub.files_at(REPO_ID)["other.txt"] == b"theirs"
    assert reg.tags() == ["run1"]  # and no tag for the refused version
    commits = [p for m, p in hub.requests if p.endswith("/commit/main")]
    assert len(commits) == 2  # the conflict is not retried


def test_hub_lost_commit_answer_is_not_a_conflict(hub: HubStandIn, tmp_path: Path) -> None:
    """The commit lands but its answer is lost: the client's retry gets 412, and the push still succeeds once."""
    reg = _hub_registry(hub)
    reg.push(_folder(tmp_path / "v1", V1), MESSAGE, "run1")
    hub.lose_commit_answer_once = True
    commit = reg.push(_folder(tmp_path / "v2", V2), "run2: second", "run2")
    assert hub.history(REPO_ID)[0].id == commit
    assert [c.title for c in hub.history(REPO_ID)][:2] == ["run2: second", "run1: score 1.31 vs baseline 1.23 (gate "
                                                          "+2% passed)"]  # exactly one new commit
    assert hub.repos[REPO_ID].tags["run2"] == commit


def test_hub_transient_errors_are_retried(hub: HubStandIn, tmp_path: Path) -> None:
    reg = _hub_registry(hub, retries=3)
    hub.fail_next = 2
    commit = reg.push(_folder(tmp_path / "v1", V1), MESSAGE, "run1")
    assert hub.repos[REPO_ID].tags == {"run1": commit}
    assert [r for r in hub.requests if r[1] == "/api/repos/create"] == [("POST", "/api/repos/create")] * 3


def test_hub_failing_server_gives_one_line_hub_error(hub: HubStandIn, tmp_path: Path) -> None:
    reg = _hub_registry(hub, retries=2)
    hub.fail_always = True
    t0 = time.monotonic()
    with pytest.raises(HubError) as info:
        reg.push(_folder(tmp_path / "v1", V1), MESSAGE, "run1")
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert "after 3 attempts" in msg and "500" in msg
    assert "\n" not in msg and hub.token not in msg
    assert len(hub.requests) == 3
    assert REPO_ID not in hub.repos or not hub.repos[REPO_ID].tags


def test_hub_dead_server_and_bad_token(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    reg = HubRegistry(REPO_ID, f"http://127.0.0.1:{port}", "hf_secret_token_123", retries=1, backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(HubError, match="ConnectError") as info:
        reg.push(_folder(tmp_path / "v1", V1), MESSAGE, "run1")
    assert time.monotonic() - t0 < 5
    assert "hf_secret_token_123" not in str(info.value)
    with HubStandIn() as hub:
        bad = HubRegistry(REPO_ID, hub.url, "hf_wrong", retries=3, backoff_s=0.01)
        with pytest.raises(HubError, match="401"):
            bad.push(tmp_path / "v1", MESSAGE, "run1")
        assert hub.requests.count(("POST", "/api/repos/create")) == 1  # a 4xx is not retried


# --------------------------------------------------------------------------------------------------- local only
def test_local_registry_layout_and_log(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "registry")
    c1 = reg.push(_folder(tmp_path / "v1", V1), MESSAGE, "run1")
    c2 = reg.push(_folder(tmp_path / "v2", V2), "run2", "run2")
    root = tmp_path / "registry"
    assert _read(root / "versions" / "run1") == V1
    log = reg.commits()
    assert [e["id"] for e in log] == [c1, c2]
    assert log[1]["parent"] == c1 and log[0]["parent"] is None
    assert log[0]["message"] == MESSAGE and log[0]["tag"] == "run1"
    assert set(log[1]["files"]) == set(V2)
    # a torn last line (kill during the append) does not break reading
    with open(root / "commits.jsonl", "a") as fh:
        fh.write('{"id": "trunc')
    assert len(reg.commits()) == 2
    assert reg.tags() == ["run1", "run2"]


# --------------------------------------------------------------------------------------------------- factory
def test_make_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths.of(tmp_path)
    cfg = default_config()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    reg = make_registry(cfg, paths)
    assert isinstance(reg, LocalRegistry) and reg.path == tmp_path / "registry"
    cfg.hub.repo_id = REPO_ID
    assert isinstance(make_registry(cfg, paths), LocalRegistry)  # a repo id without a token: still local
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef")
    cfg.hub.endpoint = "http://127.0.0.1:9"
    reg = make_registry(cfg, paths)
    assert isinstance(reg, HubRegistry)
    assert reg.describe() == f"Hugging Face Hub repo {REPO_ID} at http://127.0.0.1:9"
    assert reg.retries == cfg.hub.retries and reg.private
