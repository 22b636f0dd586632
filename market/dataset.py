"""The dataset every training phase shares: candles, features, labels, sample events and splits, built once.

Why a cache: the weekly run's phases 4-12 all need the same arrays. Building them once in phase 3 and reading them
back (``save`` / ``load``) keeps each phase a plain function of files on disk, which is what ``--resume`` needs,
and avoids recomputing features in every phase.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import Config, default_config
from core.io import atomic_write, atomic_write_json
from market.features import build_features, feature_names
from market.labels import CLASSES, cusum_events, triple_barrier
from market.splits import Splits, make_splits


@dataclass
class Dataset:
    """Aligned arrays for one run. ``X`` is float32 (bars x features), ``y`` the class index (0 short, 1 flat,
    2 long) for every bar; only ``splits`` positions may be used for fitting."""

    candles: pd.DataFrame
    features: pd.DataFrame
    labels: pd.DataFrame
    events: np.ndarray
    splits: Splits
    is_demo: bool = False

    @property
    def X(self) -> np.ndarray:  # noqa: N802 - the conventional name
        return self.features.to_numpy(np.float32)

    @property
    def y(self) -> np.ndarray:
        return (self.labels["label"].to_numpy(np.int64) + 1).astype(np.int64)  # -1/0/1 -> 0/1/2

    @property
    def feature_names(self) -> list[str]:
        return list(self.features.columns)

    def data_hash(self, positions: np.ndarray | None = None) -> str:
        """sha256 of the candles (optionally only some bars): recorded in the model manifest."""
        c = self.candles if positions is None else self.candles.iloc[positions]
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(c.index.asi8).tobytes())
        h.update(np.ascontiguousarray(c.to_numpy(np.float64)).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ persistence (phase 3 -> later phases)
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, frame in (("candles", self.candles), ("features", self.features), ("labels", self.labels)):
            atomic_write(folder / f"{name}.parquet", frame.to_parquet)
        sp = self.splits
        arrays: dict[str, np.ndarray] = {
            "events": self.events, "train": sp.train, "fit": sp.fit, "calib": sp.calib, "oos": sp.oos,
            "sweep": sp.sweep, "holdout": sp.holdout,
        }
        for k, (tr, va) in enumerate(sp.folds):
            arrays[f"fold{k}_train"] = tr
            arrays[f"fold{k}_val"] = va
        atomic_write(folder / "splits.npz", lambda tmp: np.savez(tmp, **arrays))
        meta = {"n_bars": sp.n_bars, "oos_start": sp.oos_start, "embargo": sp.embargo, "n_folds": len(sp.folds),
                "is_demo": self.is_demo, "source": self.candles.attrs.get("source", "")}
        atomic_write_json(folder / "dataset.json", meta)  # last: its presence marks a complete folder

    @classmethod
    def load(cls, folder: Path) -> Dataset:
        meta = json.loads((folder / "dataset.json").read_text())
        candles = pd.read_parquet(folder / "candles.parquet")
        candles.attrs["source"] = meta.get("source", "")
        candles.attrs["demo"] = meta.get("is_demo", False)
        z = np.load(folder / "splits.npz")
        folds = [(z[f"fold{k}_train"], z[f"fold{k}_val"]) for k in range(meta["n_folds"])]
        sp = Splits(n_bars=meta["n_bars"], oos_start=meta["oos_start"], embargo=meta["embargo"], train=z["train"],
                    fit=z["fit"], calib=z["calib"], oos=z["oos"], sweep=z["sweep"], holdout=z["holdout"],
                    folds=folds)
        return cls(candles=candles, features=pd.read_parquet(folder / "features.parquet"),
                   labels=pd.read_parquet(folder / "labels.parquet"), events=z["events"], splits=sp,
                   is_demo=bool(meta.get("is_demo", False)))


def build_dataset(candles: pd.DataFrame, config: Config | None = None) -> Dataset:
    """Features, triple-barrier labels, CUSUM events (if configured) and leak-free splits for ``candles``."""
    cfg = config or default_config()
    feats = build_features(candles, cfg)
    atr = feats["atr"].to_numpy(np.float64)
    labels = triple_barrier(candles, atr, cfg)
    events = cusum_events(candles, atr, cfg.labels.cusum_atr)
    splits = make_splits(candles.index, labels, cfg, sample_mask=events)
    assert list(feats.columns) == feature_names(cfg)
    assert len(CLASSES) == 3
    return Dataset(candles=candles, features=feats, labels=labels, events=events, splits=splits,
                   is_demo=bool(candles.attrs.get("demo", False)))


def lookahead_self_check(candles: pd.DataFrame, features: pd.DataFrame, config: Config | None = None,
                         cuts: tuple[float, ...] = (0.5, 0.9)) -> list[str]:
    """Recompute the features on truncated copies and compare with the full computation.

    Returns a list of problems (empty = the features are causal on this data). The weekly run stops on any.
    """
    problems: list[str] = []
    n = len(candles)
    for frac in cuts:
        k = max(2, int(n * frac))
        part = build_features(candles.iloc[:k], config).to_numpy()
        full = features.iloc[:k].to_numpy()
        same_nan = np.array_equal(np.isnan(part), np.isnan(full))
        if not same_nan or not np.array_equal(np.nan_to_num(part), np.nan_to_num(full)):
            diff = np.nanmax(np.abs(np.nan_to_num(part) - np.nan_to_num(full)), axis=0)
            bad = [features.columns[j] for j in np.flatnonzero(diff > 0)[:5]]
            problems.append(f"features on the first {k} bars differ from the full computation in {bad}")
    return problems
