"""Where deployed versions are published: a Hugging Face Hub model repo, or a local folder with the same semantics.

One :class:`Registry` interface so the pipeline's commit path is the same with or without a Hub account (the demo
runs it end to end on :class:`LocalRegistry`):

- ``push(folder, message, tag) -> commit id``: publish the folder as one version. The version is an exact snapshot of
  the folder (files absent from it are deleted in that version), the message's first line is the commit title (the
  rest its description: scores, gate arithmetic), and ``tag`` (the run id) names it so the bot can pin it and a
  rollback can point back to it. Pushing an existing tag again moves the tag to the new commit (a resumed run).
- ``tags()``, ``fetch(tag, dest) -> dest`` (download only: verifying the manifest before unpickling is the models
  code's job), ``describe()`` (one line for logs and reports, never a token).

Concurrency: :class:`HubRegistry` reads the branch head first and passes it as ``parent_commit``; the Hub refuses
the commit if anyone else committed in between (optimistic lock) and that surfaces as :class:`HubConflictError`,
never retried, so two writers can never interleave files. :class:`LocalRegistry` serialises writers with a file lock.

Failures: connection errors, timeouts, 429 and 5xx are retried with exponential back-off; anything left after the
retries (or a 4xx) is a :class:`HubError` with one line, so the run can roll back locally and report it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from core.config import redact, secrets
from core.errors import UserError
from core.io import atomic_write_json, fsync_dir, fsync_tree, sha256_file
from core.paths import Paths

if TYPE_CHECKING:
    from core.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class HubError(UserError):
    """Publishing or fetching a version failed (after retries where retrying makes sense): one line."""


class HubConflictError(HubError):
    """Someone else committed to the repo between our read of the head and our commit (never retried)."""


def _check_tag(tag: str) -> None:
    if not _TAG.match(tag) or ".." in tag:
        raise HubError(f"invalid tag {tag!r}: use letters, digits, '.', '_' and '-' only")


def _files_of(folder: Path) -> dict[str, Path]:
    """Relative posix path -> file, for every file below ``folder``; :class:`HubError` if it is not a folder or if
    it holds a secret (the model signing key, a ``.env``): those never leave the machine, whatever the caller built.
    """
    from ml.models.manifest import KEY_FILE

    if not folder.is_dir():
        raise HubError(f"cannot push {folder}: not a directory")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    secret = [rel for rel, p in files.items() if p.name in (KEY_FILE, ".env")]
    if secret:
        raise HubError(f"refusing to push {folder}: it holds {secret[0]} (the model signing key or secrets never "
                       f"leave the machine)")
    return files


def _prepare_dest(dest: Path) -> Path:
    """A fresh temp dir next to ``dest`` (same filesystem, so the final rename is atomic)."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise HubError(f"cannot fetch into {dest}: it exists and is not an empty directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.fetch-", dir=dest.parent))


def _move_into_place(tmp: Path, dest: Path) -> Path:
    if dest.exists():
        dest.rmdir()  # empty (checked by _prepare_dest)
    os.rename(tmp, dest)
    return dest


class Registry(ABC):
    """A store of tagged versions of a folder (see the module docstring for the contract)."""

    @abstractmethod
    def push(self, folder: Path, message: str, tag: str) -> str:
        """Publish ``folder`` as one version tagged ``tag``; returns the commit id."""

    @abstractmethod
    def tags(self) -> list[str]:
        """All tags, sorted."""

    @abstractmethod
    def fetch(self, tag: str, dest: Path) -> Path:
        """Download version ``tag`` into ``dest`` (must not exist or be empty); returns ``dest``."""

    @abstractmethod
    def describe(self) -> str:
        """One line naming the registry (no secrets)."""


# --------------------------------------------------------------------------------------------------- local
class LocalRegistry(Registry):
    """The Hub's role played by a folder: ``versions/<tag>/`` (the files), ``refs.json`` (head + tag -> commit),
    ``commits.jsonl`` (one line per commit: id, parent, message, tag, time, file hashes).

    Every write is atomic (temp + rename, fsync) and ``refs.json`` is written last, so a kill leaves either the old
    or the new refs; writers are serialised by ``.lock`` (filelock).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def _refs_path(self) -> Path:
        return self.path / "refs.json"

    @property
    def _log_path(self) -> Path:
        return self.path / "commits.jsonl"

    def _refs(self) -> dict[str, Any]:
        try:
            refs = json.loads(self._refs_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"head": None, "tags": {}}
        except (OSError, ValueError) as exc:
            raise HubError(f"{self._refs_path}: unreadable ({exc})") from None
        return {"head": refs.get("head"), "tags": dict(refs.get("tags", {}))}

    def commits(self) -> list[dict[str, Any]]:
        """The commit log, oldest first (a torn last line from a kill is skipped)."""
        if not self._log_path.is_file():
            return []
        out = []
        for line in self._log_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def push(self, folder: Path, message: str, tag: str) -> str:
        from filelock import FileLock

        _check_tag(tag)
        if not message.strip():
            raise HubError("commit message must not be empty")
        files = _files_of(Path(folder))
        hashes = {rel: sha256_file(p) for rel, p in files.items()}
        versions = self.path / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path / ".lock"), timeout=60):
            refs = self._refs()
            parent = refs["head"]
            created = datetime.now(UTC).isoformat(timespec="microseconds")
            digest = hashlib.sha1(json.dumps([parent, message, tag, created, hashes], sort_keys=True).encode())
            commit_id = digest.hexdigest()
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{tag}-", dir=versions))
            for rel, src in files.items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            fsync_tree(tmp)
            target = versions / tag
            if target.exists():
                old = versions / f".old-{tag}-{os.getpid()}"
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old)
            else:
                os.rename(tmp, target)
            fsync_dir(versions)
            entry = {"id": commit_id, "parent": parent, "message": message, "tag": tag, "time": created,
                     "files": hashes}
            with open(self._log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            refs["head"] = commit_id
            refs["tags"][tag] = commit_id
            atomic_write_json(self._refs_path, refs, sort_keys=True)
        log.info("pushed %s to %s as %s (%s)", folder, self.describe(), tag, commit_id[:8])
        return commit_id

    def tags(self) -> list[str]:
        return sorted(self._refs()["tags"])

    def fetch(self, tag: str, dest: Path) -> Path:
        _check_tag(tag)
        if tag not in self._refs()["tags"]:
            raise HubError(f"{self.describe()}: no version tagged {tag!r}")
        src = self.path / "versions" / tag
        if not src.is_dir():
            raise HubError(f"{self.describe()}: version {tag!r} is listed but {src} is missing")
        dest = Path(dest)
        tmp = _prepare_dest(dest)
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            return _move_into_place(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def describe(self) -> str:
        return f"local registry {self.path}"


# --------------------------------------------------------------------------------------------------- the Hub
def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _retryable(exc: BaseException) -> bool:
    """Transient: connection/timeout errors, 408/429/5xx, or a download that could not reach the server."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, httpx2.TransportError | LocalEntryNotFoundError):
        return True
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        return status is not None and (status >= 500 or status in (408, 429))
    return False


class HubRegistry(Registry):
    """A private Hugging Face Hub model repo through ``huggingface_hub.HfApi`` (see the module docstring)."""

    def __init__(self, repo_id: str, endpoint: str | None, token: str | None, private: bool = True,
                 retries: int = 3, backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        from huggingface_hub import HfApi, constants

        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise HubError(f"hub.repo_id {repo_id!r} must be '<user or org>/<name>'")
        self.repo_id = repo_id
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.private = private
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._token = token
        self._api = HfApi(endpoint=self.endpoint, token=token)

    def describe(self) -> str:
        return f"Hugging Face Hub repo {self.repo_id} at {self.endpoint}"

    def _scrub(self, text: str) -> str:
        text = redact(text)
        return text.replace(self._token, "***") if self._token else text

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries on transient errors; everything else (or the last failure) -> HubError."""
        attempt = 0
        while True:
            try:
                return fn()
            except HubError:
                raise
            except Exception as exc:
                first_line = self._scrub(str(exc)).strip().splitlines()[0] if str(exc).strip() else ""
                detail = f"{type(exc).__name__}: {first_line}".rstrip(": ")
                if _status(exc) in (409, 412) and what == "commit":
                    raise HubConflictError(
                        f"{self.describe()}: {what} refused, someone else committed meanwhile ({detail})"
                    ) from None
                if not _retryable(exc) or attempt >= self.retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise HubError(f"{self.describe()}: {what} failed{tries}: {detail}") from None
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                log.warning("%s: %s failed (%s); retry %d/%d in %.2fs", self.describe(), what, detail,
                            attempt + 1, self.retries, delay)
                time.sleep(delay)
                attempt += 1

    def _head(self) -> str:
        info = self._api.repo_info(self.repo_id, revision="main", repo_type="model")
        if not info.sha:
            raise HubError(f"{self.describe()}: the server did not return the head commit")
        return info.sha

    def push(self, folder: Path, message: str, tag: str) -> str:
        _check_tag(tag)
        folder = Path(folder)
        _files_of(folder)
        summary, _, description = message.strip().partition("\n")
        if not summary:
            raise HubError("commit message must not be empty")
        self._call("create repo", lambda: self._api.create_repo(
            self.repo_id, private=self.private, exist_ok=True, repo_type="model"))
        parent = self._call("read head", self._head)

        def landed() -> str | None:
            """Our commit if it is the head already (an earlier attempt whose answer was lost), else None."""
            head = self._head()
            if head == parent:
                return None
            top = self._api.list_repo_commits(self.repo_id, revision=head, repo_type="model")
            if len(top) > 1 and top[0].title == summary and top[1].commit_id == parent:
                return head
            raise HubConflictError(f"{self.describe()}: someone else committed meanwhile (head {head[:8]}, "
                                   f"expected {parent[:8]}); nothing pushed")

        def upload() -> str:
            from huggingface_hub.errors import HfHubHTTPError

            if (ours := landed()) is not None:
                return ours
            try:
                info = self._api.upload_folder(
                    repo_id=self.repo_id, folder_path=folder, repo_type="model", commit_message=summary,
                    commit_description=description.strip() or None, parent_commit=parent, delete_patterns=["*"],
                )
            except HfHubHTTPError as exc:
                # 412/409 = the head moved. The client retries a commit POST whose answer was lost, and that retry
                # is refused because our own first POST moved the head: then it is ours, not a conflict.
                if _status(exc) in (409, 412) and (ours := landed()) is not None:
                    return ours
                raise
            return str(info.oid)

        commit_id = self._call("commit", upload)
        self._call("tag", lambda: self._tag(tag, commit_id, summary))
        log.info("pushed %s to %s as %s (%s)", folder, self.describe(), tag, commit_id[:8])
        return commit_id

    def _tag(self, tag: str, commit_id: str, summary: str) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            self._api.create_tag(self.repo_id, tag=tag, revision=commit_id, tag_message=summary, repo_type="model")
        except HfHubHTTPError as exc:
            if _status(exc) != 409:
                raise
            refs = self._api.list_repo_refs(self.repo_id, repo_type="model")
            if any(t.name == tag and t.target_commit == commit_id for t in refs.tags):
                return  # a retry after a lost answer
            log.warning("%s: tag %s exists, moving it to %s", self.describe(), tag, commit_id[:8])
            self._api.delete_tag(self.repo_id, tag=tag, repo_type="model")
            self._api.create_tag(self.repo_id, tag=tag, revision=commit_id, tag_message=summary, repo_type="model")

    def tags(self) -> list[str]:
        """All tags; a repo that does not exist yet (first push) has none."""
        from huggingface_hub.errors import RepositoryNotFoundError

        def refs() -> list[str]:
            try:
                return sorted(t.name for t in self._api.list_repo_refs(self.repo_id, repo_type="model").tags)
            except RepositoryNotFoundError:
                return []

        return self._call("list tags", refs)

    def fetch(self, tag: str, dest: Path) -> Path:
        from huggingface_hub import snapshot_download

        _check_tag(tag)
        dest = Path(dest)

        def download() -> Path:
            tmp = _prepare_dest(dest)
            cache = Path(tempfile.mkdtemp(prefix=".hf-cache-", dir=dest.parent))
            try:
                snapshot_download(
                    self.repo_id, repo_type="model", revision=tag, local_dir=tmp, cache_dir=cache,
                    endpoint=self.endpoint, token=self._token, ignore_patterns=[".gitattributes"],
                )
                shutil.rmtree(tmp / ".cache", ignore_errors=True)  # the client's download metadata
                return _move_into_place(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                shutil.rmtree(cache, ignore_errors=True)

        return self._call(f"fetch {tag}", download)


# --------------------------------------------------------------------------------------------------- factory
def make_registry(cfg: Config, paths: Paths) -> Registry:
    """The Hub when ``cfg.hub.repo_id`` and the ``HF_TOKEN`` secret are both set, else the local folder registry."""
    token = secrets(["HF_TOKEN"]).get("HF_TOKEN")
    if cfg.hub.repo_id and token:
        return HubRegistry(cfg.hub.repo_id, cfg.hub.endpoint, token, private=cfg.hub.private,
                           retries=cfg.hub.retries)
    if cfg.hub.repo_id:
        log.warning("hub.repo_id is set but HF_TOKEN is not: using the local registry")
    return LocalRegistry(paths.root / cfg.hub.local_registry)
