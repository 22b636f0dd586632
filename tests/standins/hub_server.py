"""A stand-in Hugging Face Hub: just the routes ``huggingface_hub`` 2.4.0 uses for create_repo, repo info, commits,
refs, preupload, commit (ndjson, regular files only), tags, tree listing and file download.

Routes and response shapes follow the client's source (``hf_api.py``, ``_commit_api.py``, ``file_download.py``,
``_snapshot_download.py``). Every preupload answer is ``uploadMode: "regular"``, so the client never tries LFS/Xet
storage. A commit whose ``parentCommit`` is not the branch head is refused with 412, as the Hub does for a concurrent
writer. Switches: ``fail_next`` (answer the next N requests with 500), ``fail_always``, ``on_commit`` (a callback run
when a commit request arrives, e.g. to simulate another writer), ``lose_commit_answer_once`` (apply a commit but
answer 502), ``token`` (required bearer token).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.standins._http import LocalServer, QuietHandler


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


@dataclass
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, bytes]


@dataclass
class Repo:
    id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.body = body


class HubStandIn(LocalServer):
    """The server state plus the HTTP server thread. Use as a context manager; ``url`` is the endpoint."""

    def __init__(self, token: str | None = "hf_standin_token") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_next = 0
        self.fail_always = False
        self.on_commit: Callable[[], None] | None = None
        self.lose_commit_answer_once = False  # apply the next commit but answer 500, as if the answer was lost
        self._lock = threading.RLock()
        self._init_server(_make_handler(self), "hub-standin")

    @property
    def url(self) -> str:
        return self.root_url

    # ------------------------------------------------------------------ helpers for tests
    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def resolve(self, repo_id: str, rev: str) -> str:
        repo = self.repo(repo_id)
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        matches = [c for c in repo.commits if len(rev) >= 7 and c.startswith(rev)]
        if len(matches) == 1:
            return matches[0]
        raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def files_at(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self.repo(repo_id).commits[self.resolve(repo_id, rev)].files)

    def history(self, repo_id: str, rev: str = "main") -> list[Commit]:
        with self._lock:
            repo = self.repo(repo_id)
            out = []
            sha: str | None = self.resolve(repo_id, rev)
            while sha is not None:
                c = repo.commits[sha]
                out.append(c)
                sha = c.parent
            return out

    def external_commit(self, repo_id: str, files: dict[str, bytes], title: str) -> str:
        """Another writer commits to main (to test the parent_commit guard)."""
        with self._lock:
            repo = self.repo(repo_id)
            head = repo.branches["main"]
            merged = {**repo.commits[head].files, **files}
            return self._new_commit(repo, head, title, "", merged)

    def _new_commit(self, repo: Repo, parent: str | None, title: str, message: str, files: dict[str, bytes]) -> str:
        h = hashlib.sha1()
        h.update((parent or "").encode() + b"\0" + title.encode() + b"\0" + message.encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
        h.update(str(time.time_ns()).encode())
        sha = h.hexdigest()
        date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        repo.commits[sha] = Commit(sha, parent, title, message, date, files)
        repo.branches["main"] = sha
        return sha

    # ------------------------------------------------------------------ API
    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes
               ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append((method, path))
            if self.fail_always or self.fail_next > 0:
                self.fail_next = max(0, self.fail_next - 1)
                raise HttpError(500, "stand-in: injected server error")
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            raise HttpError(401, "Invalid credentials in Authorization header")
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            rest = parts[4:]
            return self._api(method, repo_id, rest, query, headers, body)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
            return self._resolve_file(method, repo_id, unquote(parts[3]), unquote("/".join(parts[4:])))
        raise HttpError(404, f"stand-in: no route for {method} {path}")

    def _create_repo(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise HttpError(400, "stand-in: model repos only")
        url = f"{self.url}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                raise HttpError(409, "You already created this model repo", body={"error": "exists", "url": url})
            repo = Repo(repo_id, payload.get("visibility") == "private")
            self.repos[repo_id] = repo
            self._new_commit(repo, None, "initial commit", "", {".gitattributes": b"*.joblib filter=lfs\n"})
        return _json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api(self, method: str, repo_id: str, rest: list[str], query: dict[str, list[str]], headers: Any,
             body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            repo = self.repo(repo_id)
            if method == "GET" and (not rest or rest[0] == "revision"):
                sha = self.resolve(repo_id, unquote(rest[1]) if rest else "main")
                files = repo.commits[sha].files
                return _json(200, {"id": repo_id, "sha": sha, "private": repo.private,
                                   "siblings": [{"rfilename": p} for p in sorted(files)]})
            if method == "GET" and rest == ["refs"]:
                def ref(name: str, kind: str, sha: str) -> dict[str, str]:
                    return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

                return _json(200, {
                    "branches": [ref(b, "heads", s) for b, s in sorted(repo.branches.items())],
                    "tags": [ref(t, "tags", s) for t, s in sorted(repo.tags.items())],
                    "converts": [], "pullRequests": [],
                })
            if method == "GET" and len(rest) == 2 and rest[0] == "commits":
                return _json(200, [
                    {"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                     "authors": [{"user": "standin"}]}
                    for c in self.history(repo_id, unquote(rest[1]))
                ])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo, unquote(rest[1]), unquote("/".join(rest[2:])), query)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                self.resolve(repo_id, unquote(rest[1]))
                files = json.loads(body)["files"]
                return _json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                             for f in files]})
            if method == "POST" and len(rest) == 2 and rest[0] == "tag":
                payload = json.loads(body)
                sha = self.resolve(repo_id, unquote(rest[1]))
                if payload["tag"] in repo.tags:
                    raise HttpError(409, f"Tag {payload['tag']} already exists")
                repo.tags[payload["tag"]] = sha
                return _json(200, {})
            if method == "DELETE" and len(rest) == 2 and rest[0] == "tag":
                if repo.tags.pop(unquote(rest[1]), None) is None:
                    raise HttpError(404, "Tag not found", "RevisionNotFound")
                return _json(200, {})
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            if self.on_commit is not None:
                callback, self.on_commit = self.on_commit, None
                callback()
            return self._commit(repo_id, unquote(rest[1]), headers, body)
        raise HttpError(404, f"stand-in: no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _tree(self, repo: Repo, rev: str, prefix: str, query: dict[str, list[str]]
              ) -> tuple[int, dict[str, str], bytes]:
        files = repo.commits[self.resolve(repo.id, rev)].files
        recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
        base = prefix.strip("/") + "/" if prefix else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(base):
                continue
            rel = path[len(base):].split("/")
            for depth in range(1, len(rel)):
                folder = base + "/".join(rel[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder,
                                                "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(rel) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
        return _json(200, list(entries.values()))

    def _commit(self, repo_id: str, rev: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if not headers.get("content-type", "").startswith("application/x-ndjson"):
            raise HttpError(400, "stand-in: commit payload must be application/x-ndjson")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "stand-in: first ndjson line must be the header")
        header = lines[0]["value"]
        with self._lock:
            repo = self.repo(repo_id)
            if rev not in repo.branches:
                raise HttpError(400, f"stand-in: can only commit to a branch, not {rev}")
            head = repo.branches[rev]
            parent = header.get("parentCommit")
            if parent is not None and not head.startswith(parent):
                raise HttpError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            for item in lines[1:]:
                key, value = item["key"], item["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HttpError(400, "stand-in: only base64 file content")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(folder)}
                else:
                    raise HttpError(400, f"stand-in: unsupported commit operation {key}")
            sha = self._new_commit(repo, head, header["summary"], header.get("description", ""), files)
            if self.lose_commit_answer_once:
                self.lose_commit_answer_once = False
                raise HttpError(502, "stand-in: commit applied, answer lost")
        return _json(200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                           "pullRequestUrl": None, "success": True})

    def _resolve_file(self, method: str, repo_id: str, rev: str, path: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            sha = self.resolve(repo_id, rev)
            files = self.repo(repo_id).commits[sha].files
            if path not in files:
                raise HttpError(404, "Entry not found", "EntryNotFound")
            data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(data)}"',
                   "Content-Type": "application/octet-stream"}
        return 200, headers, data


def _json(status: int, obj: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _make_handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _serve(self, method: str) -> None:
            body = self._body()
            split = urlsplit(self.path)
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                status, extra, data = hub.handle(method, split.path, parse_qs(split.query), headers, body)
            except HttpError as exc:
                status = exc.status
                payload = exc.body or {"error": exc.message}
                extra = {"Content-Type": "application/json", "X-Error-Message": exc.message}
                if exc.code:
                    extra["X-Error-Code"] = exc.code
                data = json.dumps(payload).encode()
            except Exception as exc:  # a bug in the stand-in: make it visible as a 500 with the reason
                status, extra, data = 500, {"Content-Type": "text/plain"}, f"stand-in crashed: {exc!r}".encode()
            self.reply(status, extra, data, send_body=method != "HEAD")

        def do_GET(self) -> None:  # noqa: N802
            self._serve("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve("HEAD")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def do_DELETE(self) -> None:  # noqa: N802
            self._serve("DELETE")

    return Handler
