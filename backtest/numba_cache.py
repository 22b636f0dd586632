"""Keep numba's on-disk cache honest when compiled code inlines functions from other files.

Why: numba's ``cache=True`` keys each cached function on its *own* source file only. The backtest kernel inlines
the rules of ``policy.py`` and ``trees.py``, and the model simulations in ``ml/models`` inline the backtest rules;
without a purge, an edited trading rule would keep running as old machine code in one place while the other runs
the new one (training silently drifting from the backtest, or step mode from fast mode).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.io import atomic_write_text


def purge_stale_cache(dispatcher: Any, sources: Sequence[Path], prefixes: tuple[str, ...], stamp_name: str) -> None:
    """Delete the cached ``*.nbi/*.nbc`` files whose names start with ``prefixes`` when any of ``sources`` changed.

    ``dispatcher`` is any ``@njit(cache=True)`` function of the package (it tells where numba writes the cache). A
    stamp file holding the sources' hash records the state the cache was built from. Call at import, before anything
    compiles. A read-only install is left alone (numba then uses its own user cache directory)."""
    digest = hashlib.sha256()
    for f in sources:
        if f.exists():
            digest.update(f.read_bytes())
    h = digest.hexdigest()[:16]
    try:
        cache_dir = Path(dispatcher._cache._cache_path)
    except AttributeError:
        cache_dir = Path(sources[0]).resolve().parent / "__pycache__"
    stamp = cache_dir / stamp_name
    try:
        if stamp.exists() and stamp.read_text() == h:
            return
        for f in cache_dir.glob("*.nb[ic]"):
            if f.name.startswith(prefixes):
                f.unlink(missing_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, h)
    except OSError:
        pass
