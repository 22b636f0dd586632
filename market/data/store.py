"""The candle store: one Parquet file per symbol and timeframe under ``data/``, written atomically.

Why atomic (temp file in the same folder + fsync + ``os.replace`` + fsync of the folder): a crash, a full disk or a
kill in the middle of a write must leave either the old file or the new one, never half of each; the weekly job and
the live bot may read the store at any moment. Why a separate ``_DEMO`` file: the demo generator must never overwrite
real broker history (an MT5 terminal only serves "Max bars in chart" of it, so a lost store may not come back).

The Parquet schema metadata keeps where the bars came from (``ml.source``) and whether they are synthetic
(``ml.demo``), so a frame read back carries the same ``attrs`` it was written with.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.config import Config
from core.errors import UserError
from core.io import atomic_write, copy_file_atomic
from core.paths import Paths
from market.data.sources import COLUMNS, PRICE_COLUMNS, check_parquet_rows

_META_SOURCE = b"ml.source"
_META_DEMO = b"ml.demo"
_META_SYMBOL = b"ml.symbol"


def store_path(paths: Paths, cfg: Config, demo: bool = False) -> Path:
    """``data/<SYMBOL>_<TF>.parquet`` (``..._DEMO.parquet`` for the demo series)."""
    symbol = re.sub(r"[^A-Za-z0-9._-]", "_", cfg.symbol)
    return paths.data / f"{symbol}_{cfg.timeframe}{'_DEMO' if demo else ''}.parquet"


def read_store(path: Path, max_rows: int | None = None) -> pd.DataFrame | None:
    """The stored frame (unvalidated) with attrs source/demo, or None when there is no store yet.

    ``max_rows`` (``data.max_rows``): refuse a file whose metadata announces more rows, before reading it."""
    if not path.exists():
        return None
    if max_rows is not None:
        check_parquet_rows(path, max_rows, "the candle store")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UserError(
            f"{path}: the candle store is unreadable ({exc}); delete it and run scripts/refresh_data.py"
        ) from None
    meta = table.schema.metadata or {}
    frame = table.to_pandas()
    if not isinstance(frame.index, pd.DatetimeIndex) or any(c not in frame.columns for c in COLUMNS):
        raise UserError(
            f"{path}: not a candle store written by this project (columns {list(frame.columns)}); "
            "delete it and run scripts/refresh_data.py"
        )
    index = frame.index.tz_convert("UTC") if frame.index.tz is not None else frame.index.tz_localize("UTC")
    out = pd.DataFrame(
        {c: frame[c].to_numpy(dtype="float64") for c in COLUMNS},
        index=pd.DatetimeIndex(index.as_unit("ns"), name="time"),
    )
    out.attrs["source"] = meta.get(_META_SOURCE, b"store").decode()
    out.attrs["demo"] = meta.get(_META_DEMO, b"0") == b"1"
    out.attrs["line_base"] = None
    return out


def write_store(path: Path, frame: pd.DataFrame, symbol: str = "") -> None:
    """Write ``frame`` (validated standard frame) to ``path`` atomically; the old file stays until the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame[list(COLUMNS)], preserve_index=True)
    meta = dict(table.schema.metadata or {})
    meta[_META_SOURCE] = str(frame.attrs.get("source", "")).encode()
    meta[_META_DEMO] = b"1" if frame.attrs.get("demo") else b"0"
    meta[_META_SYMBOL] = symbol.encode()
    table = table.replace_schema_metadata(meta)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")

    atomic_write(path, write)


def merge(old: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """Stored bars + newly fetched bars, sorted; where both have a bar the new one wins (a re-fetch corrects)."""
    if old is None or len(old) == 0:
        out = new.copy()
    elif len(new) == 0:
        out = old.copy()
    else:
        both = pd.concat([old[list(COLUMNS)], new[list(COLUMNS)]])
        keep = ~both.index.duplicated(keep="last")
        out = both[keep]
        order = np.argsort(out.index.asi8, kind="stable")
        out = out.iloc[order]
    out.attrs = dict(new.attrs)
    out.attrs["line_base"] = None
    return out


def merge_file(old: pd.DataFrame | None, new: pd.DataFrame, name: str, store_name: str) -> tuple[pd.DataFrame, int]:
    """The store extended by a candle file: bars the store lacks are added, bars both have must agree.

    Why not "the file replaces the store": a file shorter than the store, or one that starts after it, would
    silently delete history (8,000 stored bars became 100). Why refuse on disagreement instead of picking one: an
    overlapping bar with other prices means the file is another feed (exchange, broker, time zone) or corrupt, and
    mixing two feeds makes a series no market traded. ``refresh_data.py --replace`` is the explicit way out.
    Only prices are compared (exports differ in volumes and spread columns); the store's row is kept where both
    have one. Returns the merged frame (store attrs) and how many bars were new.
    """
    if old is None or len(old) == 0:
        out = new[list(COLUMNS)].copy()
        out.attrs = dict(new.attrs)
        return out, len(new)
    common = old.index.intersection(new.index)
    if len(common):
        a = old.loc[common, list(PRICE_COLUMNS)].to_numpy(dtype="float64")
        b = new.loc[common, list(PRICE_COLUMNS)].to_numpy(dtype="float64")
        bad = ~np.isclose(a, b, rtol=1e-9, atol=0.0)
        rows = np.flatnonzero(bad.any(axis=1))
        if rows.size:
            i = int(rows[0])
            cols = ", ".join(f"{c}={b[i, j]:.10g} (store {a[i, j]:.10g})" for j, c in enumerate(PRICE_COLUMNS)
                             if bad[i, j])
            raise UserError(
                f"{name}: {common[i]:%Y-%m-%d %H:%M} UTC: contradicts the stored history in {store_name} "
                f"({cols}; {rows.size} of {len(common)} overlapping bars differ): nothing stored. Use "
                "scripts/refresh_data.py --replace to replace the store with this file"
            )
    added = new.loc[~new.index.isin(old.index), list(COLUMNS)]
    out = pd.concat([old[list(COLUMNS)], added]) if len(added) else old[list(COLUMNS)].copy()
    out = out.iloc[np.argsort(out.index.asi8, kind="stable")]
    out.attrs = dict(old.attrs)
    out.attrs["line_base"] = None
    return out, len(added)


def set_aside(path: Path) -> Path | None:
    """Keep a copy of the store at ``path`` under ``data/replaced/<name>.<UTC stamp>.parquet`` before it is replaced
    on purpose (``refresh_data.py --replace``): even an explicit replace loses nothing. None when there is no store."""
    if not path.exists():
        return None
    stamp = pd.Timestamp.now(tz="UTC").strftime("%Y%m%dT%H%M%S%fZ")
    dest = path.parent / "replaced" / f"{path.stem}.{stamp}{path.suffix}"
    copy_file_atomic(path, dest)
    return dest
