"""Durable file writes and content hashes: the one implementation every layer uses.

Why one module: "a crash, a kill or a full disk leaves the old file or the new one, never a torn one" is a promise
the deploy switch, the model manifest, the candle store, the registry, the run state and every report make. It holds
only when each write does all four steps, in this order:

1. write the bytes to a temp file **in the same folder** (``os.replace`` is atomic only within one filesystem),
2. ``fsync`` the temp file (its data reaches the disk before its name does),
3. ``os.replace`` it over the target,
4. ``fsync`` the folder (the rename itself reaches the disk; POSIX only, Windows cannot open a folder).

Skipping step 2 or 4 survives SIGKILL but not a power cut; each copy written by hand skipped one of them somewhere.

Temp files are named ``.<name>.tmp.<pid>-<random><suffix>`` (hidden, unique per writer, and keeping the target's
suffix so that writers that infer the format from it, such as matplotlib, still work). :func:`tmp_glob` gives the
pattern that finds the leftovers of a killed writer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


_TMP_RE = re.compile(r"^\.(?P<target>.+)\.tmp\.(?P<pid>\d+)-[0-9a-f]{8}(?:\.[^.]*)?$")


def tmp_glob(name: str) -> str:
    """Glob (relative to the target's folder) matching the temp files a killed writer of ``name`` left behind."""
    return f".{name}.tmp.*"


def tmp_path_for(path: str | os.PathLike[str], pid: int | None = None) -> Path:
    """A fresh temp file name next to ``path`` for the writer ``pid`` (default: this process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"
                          f"{path.suffix}")


def parse_tmp_name(name: str) -> tuple[str, int] | None:
    """``(target name, writer pid)`` when ``name`` is a temp file of :func:`atomic_write`, else None."""
    m = _TMP_RE.match(name)
    return (m.group("target"), int(m.group("pid"))) if m else None


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s data to the disk (files written by libraries with a plain ``open``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a create/rename/delete inside the folder ``path`` durable (no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every file and folder below ``path``: before a folder is renamed into place, its files must be on disk
    (trainers and copies write with a plain ``open``; a rename of page-cache-only data does not survive a power cut)."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any], *,
                 before_replace: Callable[[], None] | None = None, mode: int | None = None) -> Path:
    """Create ``path`` durably through ``write(tmp)``, a callable that writes the complete content to ``tmp``.

    For content produced by a library that writes to a path (Parquet, CSV, PNG, joblib). ``before_replace`` runs
    after the temp file is on disk and before the rename (the deploy kill tests place their crash points there).
    File mode: ``mode`` when given, else the mode of the file being replaced (a rewrite never changes who may read
    it), else the umask's default. On an exception the temp file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        write(tmp)
        if mode is None and path.exists():
            mode = stat.S_IMODE(path.stat().st_mode)
        if mode is not None:
            os.chmod(tmp, mode)
        fsync_file(tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *,
                       before_replace: Callable[[], None] | None = None, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data``: afterwards it holds the old bytes or all of ``data``, whatever happens."""

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as fh:
            fh.write(data)

    return atomic_write(path, write, before_replace=before_replace, mode=mode)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded (UTF-8 by default, whatever the locale says)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """``obj`` as JSON (``json.dumps`` options, a final newline) written with :func:`atomic_write_text`."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n")


def jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, sets, tuples and anything else (as its ``str``).

    Why here: model metadata, manifests and archives all hold values that come from ML code (numpy floats, arrays,
    paths, timestamps); one conversion keeps their JSON (and so their hashes) the same. NaN and inf become None
    because JSON has no such numbers (a report metric may be undefined).
    """
    import numpy as np  # lazy: the base layer's writers do not need numpy

    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if math.isfinite(v) else None
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)


def copy_file_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy ``src`` over ``dst`` byte for byte with the same guarantee as :func:`atomic_write`."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks (model files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_dir(directory: str | os.PathLike[str], prefix: str = "") -> dict[str, str]:
    """``{prefix + relative posix path: sha256}`` of every file below ``directory``, sorted ({} if it is absent)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            p = Path(dirpath) / name
            out[prefix + p.relative_to(directory).as_posix()] = sha256_file(p)
    return dict(sorted(out.items()))
