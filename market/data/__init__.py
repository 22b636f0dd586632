"""Candles: the one interface every phase uses to get validated M15 bars (see docs/CONTRACTS.md, "Candles").

``load_candles`` answers "give me the bars" (from a file, the demo, or the store - refreshing it once when there is
none); ``refresh`` answers "bring the store up to date" (from a file, MT5 incrementally, or the demo) and is what
``scripts/refresh_data.py`` runs. Both validate before anything is returned or written. Both *return* only the
most recent ``data.history_days``; the store *keeps* everything it ever held (it never shrinks because of a run
option), and a file that contradicts it is refused unless ``--replace`` says so.

Which source, when no ``data_path`` is given and ``demo`` is False (``data.source`` in config.json):
``"mt5"`` -> MetaTrader 5; ``"file"`` -> ``data.file`` (relative to the root); ``"demo"`` -> the demo generator;
``"auto"`` -> MT5 when MT5_LOGIN is set, else ``data.file`` when set, else the demo (and ``load_candles`` prefers an
existing real store over the demo, so ``refresh_data.py --data FILE`` followed by any script uses that file's bars).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.config import Config, secrets
from core.errors import UserError
from core.paths import Paths
from market.data import store
from market.data.demo import demo_candles
from market.data.sources import BAR, COLUMNS, read_file
from market.data.validate import Gap, Report, trim_history, validate

__all__ = ["COLUMNS", "Gap", "RefreshResult", "Report", "closed_by", "load_candles", "refresh", "resolve_source"]

log = logging.getLogger("market.data")


@dataclass
class RefreshResult:
    """What a refresh produced: the validated frame a run uses (the most recent ``history_days`` of the store),
    its report, and where it came from / went."""

    frame: pd.DataFrame
    report: Report
    is_demo: bool
    source: str
    stored: Path | None = None
    new_bars: int = 0  # bars the store did not have before this refresh
    symbol_info: dict[str, Any] | None = None  # the broker's spec (MT5 only)
    warnings: list[str] = field(default_factory=list)


def resolve_source(cfg: Config) -> str:
    """``"mt5"``, ``"file"`` or ``"demo"``: where a refresh without ``data_path`` reads from."""
    src = cfg.data.source
    if src == "mt5" or (src == "auto" and "MT5_LOGIN" in secrets()):
        return "mt5"
    if src == "file" or (src == "auto" and cfg.data.file):
        if not cfg.data.file:
            raise UserError("config.json: data.file: must be set when data.source is 'file'")
        return "file"
    return "demo"


def _config_file(cfg: Config, paths: Paths) -> Path:
    p = Path(cfg.data.file or "")
    return p if p.is_absolute() else paths.root / p


def closed_by(frame: pd.DataFrame, cutoff: Any) -> pd.DataFrame:
    """Only the bars whose *close* (open time + 15 min) is at or before ``cutoff`` (a UTC time; naive = UTC).

    Why here, at the source: the walk-forward replay runs the weekly job "as of" a past Sunday. Every reader below
    applies the cut to the raw frame before validation, trimming or anything else sees it, so no phase can read a
    bar that had not closed at that time (a bar opening at 02:00 is still forming at 02:00 and is cut too)."""
    if cutoff is None:
        return frame
    ts = pd.Timestamp(cutoff)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    keep = frame.index + BAR <= ts
    if keep.all():
        return frame
    out = frame.loc[keep]
    out.attrs = dict(frame.attrs)
    out.attrs["cutoff"] = str(ts)
    if not len(out):
        raise UserError(f"{frame.attrs.get('source', 'candles')}: no bar closed at or before the cutoff {ts}")
    return out


def _checked(frame: pd.DataFrame, cfg: Config, name: str, cutoff: Any = None) -> tuple[pd.DataFrame, Report]:
    clean, report = validate(closed_by(frame, cutoff), cfg, name)
    return trim_history(clean, report, cfg)


def refresh(cfg: Config, paths: Paths, data_path: str | Path | None = None, demo: bool = False,
            replace: bool = False, cutoff: Any = None) -> RefreshResult:
    """Read the source, validate, merge into the store and write it atomically (only if all passed).

    What is *kept* and what is *used* are separate: the store only grows (a file or an MT5 fetch adds bars, it
    never deletes any), while the returned frame is the most recent ``data.history_days`` (what the run uses, so
    ``--quick`` never trims broker history for good). ``data_path`` (a candle file) is merged into the store: new
    bars are added and overlapping bars must have the same prices, else one line and nothing stored; ``replace``
    (``refresh_data.py --replace``) makes the file (or MT5's history) the whole store instead, after keeping a copy
    of the old store under ``data/replaced/``. MT5 fetches from the last stored bar and merges (a re-fetched bar
    corrects the stored one); a store holding another feed is not extended by MT5 without ``replace``. The demo
    goes to its own ``_DEMO`` store (regenerated from its seed, so it is simply rewritten) and never touches real
    history.

    ``cutoff``: a source that ends there (:func:`closed_by`): only bars closed at or before it are read, validated,
    stored and returned (the walk-forward replay's "as of" Sunday S).
    """
    kind = "file" if data_path is not None else "demo" if demo else resolve_source(cfg)
    max_rows = cfg.data.max_rows
    if kind == "demo":
        full, report = validate(closed_by(demo_candles(cfg), cutoff), cfg, "demo")
        target = store.store_path(paths, cfg, demo=True)
        old = store.read_store(target, max_rows) if target.exists() else None
        new_bars = len(full) if old is None else int((~full.index.isin(old.index)).sum())
        store.write_store(target, full, cfg.symbol)
        frame, report = trim_history(full, report, cfg)
        return RefreshResult(frame, report, True, frame.attrs["source"], target, new_bars)

    target = store.store_path(paths, cfg)
    if kind == "file":
        path = Path(data_path) if data_path is not None else _config_file(cfg, paths)
        incoming, file_report = validate(closed_by(read_file(path, cfg), cutoff), cfg, str(path))
        old = None if replace else store.read_store(target, max_rows)
        merged, new_bars = store.merge_file(old, incoming, str(path), str(target))
        name = str(path) if old is None else f"{target} + {path}"
        full, report = validate(merged, cfg, name) if old is not None else (merged, file_report)
        warnings = list(dict.fromkeys(file_report.warnings + report.warnings))
        if replace and (aside := store.set_aside(target)) is not None:
            warnings.append(f"--replace: the previous store is kept as {aside}")
            log.warning("--replace: %s replaced by %s; the previous store is kept as %s", target, path, aside)
        report = dataclasses.replace(report, duplicates_dropped=file_report.duplicates_dropped, warnings=warnings)
        if new_bars or old is None:
            store.write_store(target, full, cfg.symbol)
        frame, report = trim_history(closed_by(full, cutoff), report, cfg)
        frame.attrs["source"] = incoming.attrs["source"]
        return RefreshResult(frame, report, False, frame.attrs["source"], target, new_bars, warnings=warnings)

    from market.data import mt5  # only here: the bridge client is not needed for files and the demo

    old = None if replace else store.read_store(target, max_rows)
    if old is not None and not str(old.attrs.get("source", "")).startswith(f"mt5 {cfg.symbol} "):
        # Another feed (an imported file): MT5 bars appended to it would make a series no market traded, and
        # dropping it would lose history. The user decides (the replaced store is kept under data/replaced/).
        raise UserError(f"{target}: holds {old.attrs.get('source')}, not MT5 history of {cfg.symbol}: MT5 bars are "
                        "not mixed into another feed; run scripts/refresh_data.py --replace to start the store from "
                        "MT5 (the current store is kept under data/replaced/)")
    if old is not None and len(old):
        validate(old, cfg, str(target))  # a damaged store must not be extended
    since = old.index[-1] if old is not None and len(old) else None
    fetched = mt5.fetch(cfg, since=since)
    if replace and (aside := store.set_aside(target)) is not None:
        log.warning("--replace: %s replaced by MT5 history; the previous store is kept as %s", target, aside)
    merged = store.merge(old, fetched.frame)
    full, report = validate(merged, cfg, fetched.frame.attrs["source"])
    new_bars = len(fetched.frame) if old is None else int((~fetched.frame.index.isin(old.index)).sum())
    warnings = report.warnings + fetched.warnings
    if new_bars or old is None or len(full) != len(old):
        store.write_store(target, full, cfg.symbol)
    frame, report = trim_history(closed_by(full, cutoff), report, cfg)  # the store keeps all, the run: <= cutoff
    return RefreshResult(
        frame, report, False, frame.attrs["source"], target, new_bars, fetched.symbol_info, warnings=warnings
    )


def load_candles(cfg: Config, paths: Paths, data_path: str | Path | None = None, demo: bool = False,
                 cutoff: Any = None) -> pd.DataFrame:
    """The validated standard frame (most recent ``history_days``): ``data_path`` or the demo when given (nothing is
    written), else the store, refreshed from the configured source first when there is no store yet. ``cutoff``:
    only bars closed at or before it (:func:`closed_by`)."""
    if data_path is not None:
        path = Path(data_path)
        return _checked(read_file(path, cfg), cfg, str(path), cutoff)[0]
    if demo:
        return _checked(demo_candles(cfg), cfg, "demo", cutoff)[0]
    kind = resolve_source(cfg)
    real = store.store_path(paths, cfg)
    use_real = kind != "demo" or (cfg.data.source == "auto" and real.exists())
    target = real if use_real else store.store_path(paths, cfg, demo=True)
    stored = store.read_store(target, cfg.data.max_rows)
    if stored is None:
        return refresh(cfg, paths, demo=not use_real, cutoff=cutoff).frame
    return _checked(stored, cfg, str(target), cutoff)[0]
