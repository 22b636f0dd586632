"""core.io: the one durable-write implementation (old content or new content, never a torn file)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.io import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    copy_file_atomic,
    hash_dir,
    sha256_file,
    tmp_glob,
)


def test_writes_replace_content_and_leave_no_temp_file(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "state.json"
    atomic_write_json(p, {"b": 1, "a": [1.5, None]}, sort_keys=True)
    assert p.read_text(encoding="utf-8") == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    atomic_write_text(p, "é\n")
    assert p.read_bytes() == "é\n".encode()
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in p.parent.iterdir()) == ["state.json"]


def test_failed_writer_keeps_old_content_and_removes_temp(tmp_path: Path) -> None:
    p = tmp_path / "table.csv"
    p.write_text("old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, half_then_fail)
    assert p.read_text() == "old\n"
    assert list(tmp_path.glob(tmp_glob(p.name))) == []


def test_temp_name_keeps_the_suffix_for_format_sniffing_writers(tmp_path: Path) -> None:
    """np.savez appends '.npz' and matplotlib picks the format from the suffix: the temp file must keep it."""
    import numpy as np

    p = atomic_write(tmp_path / "splits.npz", lambda tmp: np.savez(tmp, a=np.arange(3)))
    assert np.load(p)["a"].tolist() == [0, 1, 2]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["splits.npz"]


def test_sigkill_before_replace_leaves_old_file_and_a_findable_temp(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text('{"old": true}\n')
    code = textwrap.dedent(f"""
        import os, signal
        from core.io import atomic_write_bytes
        atomic_write_bytes({str(p)!r}, b'{{"new": true}}\\n',
                           before_replace=lambda: os.kill(os.getpid(), signal.SIGKILL))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(p.read_text()) == {"old": True}
    leftovers = list(tmp_path.glob(tmp_glob("config.json")))
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b'{"new": true}\n'


def test_hashes_match_hashlib_and_cover_subfolders(tmp_path: Path) -> None:
    d = tmp_path / "models"
    (d / "sub").mkdir(parents=True)
    blob = os.urandom(3 << 20)  # several read chunks
    (d / "sub" / "b.bin").write_bytes(blob)
    (d / "a.json").write_text("{}")
    copy_file_atomic(d / "a.json", d / "c.json")
    assert sha256_file(d / "sub" / "b.bin") == hashlib.sha256(blob).hexdigest()
    got = hash_dir(d, "models/")
    assert list(got) == ["models/a.json", "models/c.json", "models/sub/b.bin"]
    assert got["models/c.json"] == got["models/a.json"] == hashlib.sha256(b"{}").hexdigest()
    assert hash_dir(tmp_path / "absent") == {}


def test_a_rewrite_keeps_the_file_mode_and_temp_names_parse(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text("{}")
    p.chmod(0o600)
    atomic_write_text(p, '{"a": 1}\n')
    assert (p.stat().st_mode & 0o777) == 0o600  # a rewrite never widens who may read the file
    atomic_write_text(tmp_path / "m.joblib", "x")
    atomic_write_bytes(tmp_path / "n.joblib", b"x", mode=0o640)
    assert ((tmp_path / "n.joblib").stat().st_mode & 0o777) == 0o640
    from core.io import parse_tmp_name, tmp_path_for

    assert parse_tmp_name(tmp_path_for(tmp_path / "BTCUSD_M15.parquet", 4321).name) == ("BTCUSD_M15.parquet", 4321)
    assert parse_tmp_name(tmp_path_for(tmp_path / "config.json.new.run-1").name)[0] == "config.json.new.run-1"
    assert parse_tmp_name("config.json") is None and parse_tmp_name(".config.json.tmp.12") is None
