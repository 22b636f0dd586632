"""Retrain one row of the model table (:mod:`ml.models.specs`) on its own and deploy it: ``scripts/retrain_*.py``
(command lines in :mod:`cli.retrain`).

Steps: check the prerequisites in ``models/`` (milliseconds, before any data is loaded), load and validate the
candles, build the dataset and run the look-ahead self-check; seed a staging folder with the deployed models
(``manifest.copy_set``), train the model against the models in that folder and save it there
(:func:`ml.models.specs.train_and_save`: the same path as phases 7-10 of the weekly run, with the round-trip check);
then deploy the staged set with :func:`ops.deploy.apply` (backup, registry version tagged with the run id, journaled
atomic switch, git commit in a git work tree; config.json unchanged) and print what changed. Any problem: one line
on stderr, exit code 2, ``models/`` untouched.

Hyperparameters: ``--params FILE``, else ``results/best_params_<model>.json`` when present (the weekly run's studies
write them there), else the model's defaults. The signal models take ``{"model_params": {"rf": {...}, "xgb":
{...}, "lgb": {...}}}`` (or the nested mapping itself), the others a flat JSON object of LightGBM parameters
(optionally under ``model_params`` / ``best_params``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.config import Config
from core.errors import UserError
from core.paths import Paths
from ml.models.specs import SPECS, ModelSpec


def load_params(spec: ModelSpec, path: str | None, paths: Paths) -> tuple[dict[str, Any] | None, str]:
    """(params or None for the defaults, where they came from); :class:`UserError` naming the file if malformed."""
    p = Path(path) if path else paths.results / spec.params_file
    if not p.exists():
        if path:
            raise UserError(f"{p}: parameter file not found (--params)")
        return None, f"defaults (no results/{spec.params_file})"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if spec.nested_params:
        subs = {k.removeprefix("signal_") for k in spec.keys}
        nested = doc.get("model_params", doc) if isinstance(doc, dict) else None
        if not isinstance(nested, dict) or not nested or not set(nested) <= subs or \
                not all(isinstance(v, dict) for v in nested.values()):
            raise UserError(f"{p}: expected {{\"model_params\": {{\"rf\": {{...}}, \"xgb\": {{...}}, \"lgb\": "
                            f"{{...}}}}}} (per-model constructor parameters)")
        return nested, str(p)
    if isinstance(doc, dict):
        for k in ("model_params", "best_params"):
            if isinstance(doc.get(k), dict):
                doc = doc[k]
                break
    if not isinstance(doc, dict) or not all(isinstance(v, int | float | str | bool) for v in doc.values()):
        raise UserError(f"{p}: expected a JSON object of LightGBM parameters, e.g. {{\"num_leaves\": 15, "
                        f"\"learning_rate\": 0.05}} (optionally under \"model_params\")")
    return doc, str(p)


def _scores(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The validation numbers of a retrain, flat (for the registry / git message and the deploy history)."""
    val = metrics.get("val") or {}
    val = val.get("ensemble", val) if isinstance(val, Mapping) else {}
    out: dict[str, float] = {}
    for k, v in val.items():
        for kk, vv in (v.items() if isinstance(v, Mapping) else [("", v)]):
            if isinstance(vv, int | float) and not isinstance(vv, bool):
                out[f"val_{k}{'_' + kk if kk else ''}"] = round(float(vv), 6)
    return out


def retrain(spec: ModelSpec, paths: Paths, cfg: Config, data: str | None, demo: bool, params_path: str | None,
            run_id: str, stage_only: bool, n_jobs: int | None = None) -> dict[str, Any]:
    """The whole retrain under the caller's run lock (after recovery); returns a summary (also printed)."""
    from market.data import load_candles
    from market.dataset import build_dataset, lookahead_self_check
    from ml.models.manifest import require
    from ops import deploy

    if spec.prerequisites:  # known in milliseconds, before any data is loaded
        require(paths.models, spec.prerequisites, spec.label)
    params, params_src = load_params(spec, params_path, paths)

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

    staged = deploy.stage_dir(paths, run_id)
    try:
        lines, trained = _train_and_stage(spec, paths, ds, cfg, params, staged, is_demo, tag, n_jobs)
    except BaseException:
        # nothing was deployed: drop the half-written staging folder (never after apply() started: recovery may
        # need the staged files to roll a switch forward)
        shutil.rmtree(staged.parent, ignore_errors=True)
        raise
    if stage_only:
        lines.append(f"staged only (not deployed): {staged}")
    else:
        from ops.hub import make_registry

        done = deploy.apply(paths, run_id, staged, None, reason=f"{spec.script} {run_id}: retrained the {spec.label}",
                            scores=_scores(trained.metrics), details="\n".join(lines),
                            registry=make_registry(cfg, paths), git_commit=cfg.pipeline.git_commit,
                            keep_backups=cfg.pipeline.keep_backups)
        lines.append(f"deployed {run_id}: {paths.models} (config.json unchanged)")
        lines.append(f"backup {done.backup.path}; {done.registry}; {done.git}")
    for line in lines:
        print(f"{tag}{line}")
    return {"run_id": run_id, "staged": str(staged), "deployed": not stage_only, "metrics": trained.metrics,
            "lines": lines}


def _train_and_stage(spec: ModelSpec, paths: Paths, ds: Any, cfg: Config, params: dict[str, Any] | None,
                     staged: Path, is_demo: bool, tag: str, n_jobs: int | None) -> tuple[list[str], Any]:
    """Seed ``staged`` with the deployed models, train and save ``spec`` there; the "what changed" lines."""
    from ml.models.manifest import copy_set, read_manifest
    from ml.models.specs import train_and_save

    old_table = read_manifest(paths.models)["models"] if (paths.models / "manifest.json").exists() else {}
    kept = copy_set(paths.models, staged)
    t = train_and_save(spec, ds, cfg, staged, params, demo=is_demo, n_jobs=n_jobs)
    tr = t.extra.get("train_range")
    if tr:  # the signal ensemble: fit and calibration windows, rounds
        tm, p = t.extra["timings_s"], t.extra["params"]
        print(f"{tag}trained on fit {tr['n_fit']:,} samples ({tr['start']} .. {tr['fit_end']}), calibrated on "
              f"{tr['n_calib']:,} ({tr['calib_start']} .. {tr['end']}, {t.metrics['calibration_method']}) in "
              f"{t.seconds:.1f} s (early stop {tm['early_stop']:.1f}, fit {tm['fit']:.1f}, calibrate "
              f"{tm['calibrate']:.1f}); rounds xgb {p['xgb']['n_estimators']}, lgb {p['lgb']['n_estimators']}")
    else:
        print(f"{tag}trained {spec.label} in {t.seconds:.1f} s")
    new_table = read_manifest(staged)["models"]
    lines = []
    for key in spec.keys:
        old, new = old_table.get(key), new_table[key]
        old_sha = old["sha256"][:12] if old else "none"
        same = " (identical file)" if old and old["sha256"] == new["sha256"] else ""
        lines += [f"{key}: sha256 {old_sha} -> {new['sha256'][:12]}{same}",
                  f"{key}: old {spec.summary(old.get('metrics')) if old else 'n/a (no previous model)'}",
                  f"{key}: new {spec.summary(new['metrics'])}"]
    others = [k for k in kept if k not in spec.keys]
    lines.append(f"kept unchanged: {', '.join(others) if others else 'no other models'}")
    stale = [k for k in spec.downstream if k in kept]
    if stale:
        scripts = ", ".join(f"scripts/{s.script}" for s in SPECS.values() if set(s.keys) & set(stale))
        lines.append(f"note: {', '.join(stale)} were trained on top of the previous {spec.label}; retrain them "
                     f"({scripts})")
    return lines, t

