#!/usr/bin/env python
"""Retrain the position (exit) model and deploy it atomically; also the shared driver of retrain_sltp / retrain_risk.

Steps: check the prerequisites in ``models/`` (the position model needs the signal models; SL/TP needs signal +
position; risk needs signal + position + SL/TP), load and validate the candles, build the dataset and run the
look-ahead self-check; seed a staging folder with the deployed models (``manifest.copy_set``), train the model
against the models in that folder, save it with its manifest entry, check that the saved file loads back and
predicts identically; switch ``models/`` atomically with ``ops.deploy.commit`` (config.json unchanged) and print what
changed (old vs new sha256 and validation metrics). Any problem: one line on stderr, exit code 2, ``models/``
untouched.

    python scripts/retrain_position.py --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/retrain_position.py --demo --root /tmp/run1 --params results/best_params_position.json

Hyperparameters: ``--params FILE`` (JSON of LightGBM parameters: flat, or under ``model_params`` / ``best_params``
as the Optuna study writes them), else ``results/best_params_<model>.json`` when present, else the module's
``DEFAULT_PARAMS``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import Config, load_config, load_dotenv_file  # noqa: E402
from core.errors import UserError, cli_main  # noqa: E402
from core.paths import Paths  # noqa: E402


@dataclass(frozen=True)
class ModelSpec:
    """What differs between the three retrain scripts."""

    key: str  # manifest key
    label: str  # for messages ("position model" -> "position model needs the signal models: ...")
    prerequisites: tuple[str, ...]
    params_file: str  # default parameter file under results/
    downstream: tuple[str, ...]  # models trained on top of this one (told to retrain them)
    train: Callable[[Any, Config, Path, dict[str, Any] | None], tuple[Any, dict[str, Any]]]
    feature_names: Callable[[Any, Any], list[str]]  # (model, dataset) -> names recorded in the manifest
    summary: Callable[[dict[str, Any] | None], str]  # metrics -> one short text
    probe: Callable[[Any, Any], Any]  # (model, dataset) -> predictions for the round-trip check


def _f(m: dict[str, Any] | None, *keys: str) -> float:
    cur: Any = m or {}
    for k in keys:
        cur = cur.get(k) if isinstance(cur, dict) else None
    try:
        return float(cur) if cur is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------------------------- the three models
def _position_spec() -> ModelSpec:
    import numpy as np

    from ml.models.manifest import SIGNAL_KEYS
    from ml.models.position import train_position

    def probe(model: Any, ds: Any) -> Any:
        rng = np.random.default_rng(0)
        return model.predict_exit(rng.normal(size=(256, len(model.feature_names))))

    return ModelSpec(
        key="position", label="position model", prerequisites=tuple(SIGNAL_KEYS),
        params_file="best_params_position.json", downstream=("sl_tp", "risk"),
        train=lambda ds, cfg, folder, params: train_position(ds, cfg, folder, params=params),
        feature_names=lambda model, ds: list(model.feature_names),
        summary=lambda m: (f"val acc {_f(m, 'val', 'accuracy'):.4f} exit precision "
                           f"{_f(m, 'val', 'exit_precision'):.4f} auc {_f(m, 'val', 'auc'):.4f} objective "
                           f"{_f(m, 'val', 'objective'):.4f} ({_f(m, 'val', 'n'):.0f} rows)"),
        probe=probe,
    )


def _sltp_spec() -> ModelSpec:
    from ml.models.manifest import SIGNAL_KEYS
    from ml.models.sltp import train_sltp

    return ModelSpec(
        key="sl_tp", label="SL/TP model", prerequisites=(*SIGNAL_KEYS, "position"),
        params_file="best_params_sltp.json", downstream=("risk",),
        train=lambda ds, cfg, folder, params: train_sltp(ds, cfg, folder, params=params),
        feature_names=lambda model, ds: list(ds.feature_names),
        summary=lambda m: (f"val sl skill {_f(m, 'val', 'sl', 'skill'):.4f} coverage "
                           f"{_f(m, 'val', 'sl', 'coverage'):.3f} mean {_f(m, 'val', 'sl', 'pred_mean'):.2f} ATR; "
                           f"tp skill {_f(m, 'val', 'tp', 'skill'):.4f} reach {_f(m, 'val', 'tp', 'reach_rate'):.3f} "
                           f"mean {_f(m, 'val', 'tp', 'pred_mean'):.2f} ATR ({_f(m, 'val', 'n'):.0f} entries)"),
        probe=lambda model, ds: model.predict(ds.X[ds.splits.calib[:256]]),
    )


def _risk_spec() -> ModelSpec:
    import numpy as np

    from backtest.policy import ACCOUNT_STATE_FEATURES
    from ml.models.manifest import SIGNAL_KEYS
    from ml.models.risk import train_risk

    def probe(model: Any, ds: Any) -> Any:
        rng = np.random.default_rng(0)
        return model.multiplier(np.abs(rng.normal(size=(256, len(ACCOUNT_STATE_FEATURES)))))

    return ModelSpec(
        key="risk", label="risk model", prerequisites=(*SIGNAL_KEYS, "position", "sl_tp"),
        params_file="best_params_risk.json", downstream=(),
        train=lambda ds, cfg, folder, params: train_risk(ds, cfg, folder, params=params),
        feature_names=lambda model, ds: list(ACCOUNT_STATE_FEATURES),
        summary=lambda m: (f"val rmse {_f(m, 'val', 'rmse'):.4f} (const 1.0: {_f(m, 'val', 'rmse_const1'):.4f}), "
                           f"sized mean R {_f(m, 'val', 'sized_mean_r'):.3f} vs unsized {_f(m, 'val', 'mean_r'):.3f}, "
                           f"multiplier {_f(m, 'val', 'mult_min'):.2f}..{_f(m, 'val', 'mult_max'):.2f} "
                           f"({_f(m, 'val', 'n'):.0f} trades)"),
        probe=probe,
    )


SPECS: dict[str, Callable[[], ModelSpec]] = {"position": _position_spec, "sl_tp": _sltp_spec, "risk": _risk_spec}
# checked before the heavy imports (numba, LightGBM) of the specs: a missing prerequisite fails in well under a second
PREREQUISITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "position": ("position model", ("signal_rf", "signal_xgb", "signal_lgb")),
    "sl_tp": ("SL/TP model", ("signal_rf", "signal_xgb", "signal_lgb", "position")),
    "risk": ("risk model", ("signal_rf", "signal_xgb", "signal_lgb", "position", "sl_tp")),
}


# ------------------------------------------------------------------------------------------------ plumbing
def load_params(path: str | None, paths: Paths, default_name: str) -> tuple[dict[str, Any] | None, str]:
    """(LightGBM params or None for the defaults, where they came from)."""
    p = Path(path) if path else paths.results / default_name
    if not p.exists():
        if path:
            raise UserError(f"{p}: parameter file not found (--params)")
        return None, f"defaults (no results/{default_name})"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if isinstance(doc, dict):
        for k in ("model_params", "best_params"):
            if isinstance(doc.get(k), dict):
                doc = doc[k]
                break
    if not isinstance(doc, dict) or not all(isinstance(v, int | float | str | bool) for v in doc.values()):
        raise UserError(f"{p}: expected a JSON object of LightGBM parameters, e.g. {{\"num_leaves\": 15, "
                        f"\"learning_rate\": 0.05}} (optionally under \"model_params\")")
    return doc, str(p)


def retrain(spec: ModelSpec, paths: Paths, cfg: Config, data: str | None, demo: bool, params_path: str | None,
            run_id: str, stage_only: bool) -> dict[str, Any]:
    """The whole retrain under the caller's run lock; returns a summary (also printed)."""
    from market.data import load_candles
    from market.dataset import build_dataset, lookahead_self_check
    from ml.models.manifest import require
    from ops.deploy import commit, stage_dir

    # prerequisites first: a missing model is known in milliseconds, before any data is loaded
    require(paths.models, spec.prerequisites, spec.label)
    params, params_src = load_params(params_path, paths, spec.params_file)
    config_text = paths.config.read_text(encoding="utf-8")

    candles = load_candles(cfg, paths, data, demo)
    is_demo = bool(candles.attrs.get("demo", False))
    tag = "DEMO " if is_demo else ""
    if is_demo:
        print("DEMO DATA: synthetic BTC-like candles, not a market - models trained on them are DEMO models")
    ds = build_dataset(candles, cfg)
    problems = lookahead_self_check(candles, ds.features, cfg)
    if problems:
        raise UserError(f"look-ahead self-check failed: {problems[0]}")
    print(f"{tag}data: {candles.attrs.get('source', data or 'store')}: {len(candles):,} bars "
          f"{candles.index[0]} .. {candles.index[-1]}")
    print(f"{tag}params: {params_src}")

    staged = stage_dir(paths, run_id)
    try:
        lines = _train_and_stage(spec, paths, ds, cfg, params, staged, is_demo, tag)
    except BaseException:
        shutil.rmtree(staged.parent, ignore_errors=True)  # nothing deployed: drop the half-written staging folder
        raise
    if stage_only:
        lines.append(f"staged only (not deployed): {staged}")
    else:
        commit(paths, run_id, staged, config_text)
        lines.append(f"deployed {run_id}: {paths.models} (config.json unchanged)")
    for line in lines:
        print(f"{tag}{line}")
    return {"run_id": run_id, "staged": str(staged), "deployed": not stage_only, "lines": lines}


def _train_and_stage(spec: ModelSpec, paths: Paths, ds: Any, cfg: Config, params: dict[str, Any] | None,
                     staged: Path, is_demo: bool, tag: str) -> list[str]:
    import numpy as np

    from ml.models.manifest import copy_set, load_model, read_manifest, save_model

    old_table = read_manifest(paths.models)["models"] if (paths.models / "manifest.json").exists() else {}
    kept = copy_set(paths.models, staged)
    t0 = time.perf_counter()
    model, metrics = spec.train(ds, cfg, staged, params)
    train_s = time.perf_counter() - t0
    print(f"{tag}trained {spec.label} in {train_s:.1f} s")
    info = getattr(model, "info", {}) or {}
    names = spec.feature_names(model, ds)
    save_model(staged, spec.key, model, feature_names=names, train_range=info.get("train_range", {}),
               data_hash=str(info.get("data_hash", ds.data_hash())), params=getattr(model, "params", None) or {},
               seed=int(getattr(model, "seed", cfg.tuning.seed)), metrics={**metrics, "demo": is_demo},
               kind=spec.key)
    loaded = load_model(staged, spec.key, names)
    if not np.array_equal(np.asarray(spec.probe(loaded, ds)), np.asarray(spec.probe(model, ds))):
        raise UserError(f"the {spec.label} saved in {staged} does not reproduce the trained model's predictions")

    old, new = old_table.get(spec.key), read_manifest(staged)["models"][spec.key]
    old_sha = old["sha256"][:12] if old else "none"
    same = " (identical file)" if old and old["sha256"] == new["sha256"] else ""
    lines = [f"{spec.key}: sha256 {old_sha} -> {new['sha256'][:12]}{same}",
             f"{spec.key}: old {spec.summary((old or {}).get('metrics')) if old else 'n/a (no previous model)'}",
             f"{spec.key}: new {spec.summary(metrics)}"]
    others = [k for k in kept if k != spec.key]
    lines.append(f"kept unchanged: {', '.join(others) if others else 'no other models'}")
    stale = [k for k in spec.downstream if k in kept]
    if stale:
        lines.append(f"note: {', '.join(stale)} were trained on top of the previous {spec.label}; retrain them "
                     f"({', '.join('scripts/retrain_' + ('sltp' if k == 'sl_tp' else k) + '.py' for k in stale)})")
    return lines


def main_for(kind: str) -> Callable[[], int]:
    """The ``main`` of ``scripts/retrain_<kind>.py`` (the three scripts share it)."""

    def main() -> int:
        label, needs = PREREQUISITES[kind]
        script = {"position": "position", "sl_tp": "sltp", "risk": "risk"}[kind]
        ap = argparse.ArgumentParser(description=f"Retrain the {label} and deploy it atomically "
                                                 f"(needs: {', '.join(needs)})")
        ap.add_argument("--root", default=None, help="run root with config.json, data/, models/ (default: the "
                                                     "repository)")
        ap.add_argument("--data", default=None, help="candle file to train on instead of the store")
        ap.add_argument("--demo", action="store_true", help="train on the seeded demo candles (DEMO models)")
        ap.add_argument("--params", default=None, help=f"JSON of LightGBM parameters (default: "
                                                       f"results/best_params_{script}.json if present, else the "
                                                       f"defaults)")
        ap.add_argument("--run-id", default=None, help="id of the staging folder / deploy journal entry")
        ap.add_argument("--stage-only", action="store_true", help="write staging/<run-id>/models but do not deploy")
        args = ap.parse_args()
        if args.data and args.demo:
            ap.error("--data and --demo exclude each other")
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        paths = Paths.of(args.root)
        load_dotenv_file(paths.root)
        cfg = load_config(paths.config)
        run_id = args.run_id or f"retrain-{script}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"

        from ml.models.manifest import require
        from ops.deploy import recover
        from ops.lock import run_lock

        with run_lock(paths):
            note = recover(paths)
            if note:
                print(f"recovered: {note}")
            require(paths.models, needs, label)
            spec = SPECS[kind]()
            retrain(spec, paths, cfg, args.data, args.demo, args.params, run_id, args.stage_only)
        return 0

    return main


if __name__ == "__main__":
    cli_main(main_for("position"))
