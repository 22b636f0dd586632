#!/usr/bin/env python
"""Benchmark of the whole weekly run (issue: 20 minutes on 2 cores, <= 4 GB, quality kept).

Workloads (printed in the output):

* ``demo3y``: the demo generator's default, 105,120 M15 bars (~3 years), all 13 phases, the config's default trial
  counts (100 signal, 50 position), the moderate profile's full sweep grid;
* ``real``: ``../shared/data/BTCUSDT_15m_2023_2024.csv`` (70,175 real bars), same settings;
* ``scaling``: the demo for 1, 2 and 3 years side by side (cost should grow about linearly in bars).

Each run is ``scripts/weekly_optimize.py`` in a fresh root, as a child process; its process tree's resident memory
is sampled from /proc every 0.2 s (peak = the largest sum over all its processes, loky workers included). The
per-phase table comes from the run's own report.json.

Quality: the *reference* configuration (no pruning, no CUSUM event subsampling, the same trial counts) is run once
per workload and its result recorded under ``bench/reference_<workload>.json`` (``--reference`` to (re)make it).
The fast configuration passes when its best validation objective is within ``--tol-objective`` (absolute, default
0.01 = one point of F1 x (1 - DD)) of the reference's and its final OOS score is not below the reference's by
more than ``--tol-score`` (absolute, default 0.25). The last line is
``total_s=<float> peak_rss_mb=<int> quality_ok=<true|false>``.

    python bench/weekly_run.py                      # demo3y, compare with the recorded reference
    python bench/weekly_run.py --workload real
    python bench/weekly_run.py --workload scaling
    python bench/weekly_run.py --reference          # run + record the slow reference too (long)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.config import config_to_json, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent

REAL = REPO.parent / "shared" / "data" / "BTCUSDT_15m_2023_2024.csv"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root_pid: int) -> int:
    """Sum of RSS (bytes) of ``root_pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                parts = fh.read().rsplit(")", 1)[1].split()
            ppid = int(parts[1])
            with open(f"/proc/{d}/statm") as fh:
                rss[int(d)] = int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, stack = 0, [root_pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def _config(profile: str = "moderate", *, demo_bars: int | None = None, reference: bool = False,
            trials: tuple[int, int] | None = None) -> str:
    raw = load_config(REPO / "config.json").model_dump(mode="json")  # the shipped (fast) configuration
    raw["risk_profile"] = profile
    if demo_bars:
        raw["data"]["demo_bars"] = demo_bars
    if trials:
        raw["tuning"]["signal_trials"], raw["tuning"]["position_trials"] = trials
    if reference:
        raw["labels"]["cusum_atr"] = 0.0
        raw["tuning"]["pruning"] = False
    return config_to_json(parse_config(raw))


def run_once(label: str, config_text: str, data: Path | None, workdir: Path) -> dict[str, Any]:
    """One whole weekly run in a fresh root; returns timings, memory, objective and score."""
    root = workdir / label
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / "config.json").write_text(config_text)
    cmd = [sys.executable, str(REPO / "scripts" / "weekly_optimize.py"), "--root", str(root)]
    cmd += ["--data", str(data)] if data else ["--demo"]
    log = (root / "run.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    log.close()
    if rc != 0:
        tail = (root / "run.log").read_text()[-3000:]
        raise SystemExit(f"{label}: weekly_optimize.py exited {rc}\n{tail}")
    rep_path = sorted((root / "results").glob("*/report.json"))[-1]
    rep = json.loads(rep_path.read_text())
    phases = [(p["number"], p["name"], float(p.get("seconds") or 0.0)) for p in
              sorted(rep["phases"], key=lambda p: p["number"])]
    ev = rep.get("evaluation") or {}
    return {
        "label": label, "wall_s": round(wall, 1), "peak_rss_mb": int(peak / 2**20), "phases": phases,
        "bars": (rep.get("data") or {}).get("rows"),
        "signal_best_value": (rep.get("optuna_signal") or {}).get("best_value"),
        "signal_trials": (rep.get("optuna_signal") or {}).get("n_trials"),
        "signal_pruned": (rep.get("optuna_signal") or {}).get("n_pruned"),
        "position_best_value": (rep.get("optuna_position") or {}).get("best_value"),
        "oos_score": (ev.get("new_full") or {}).get("score"),
        "holdout_score": (ev.get("new_holdout") or {}).get("score"),
        "decision": (rep.get("decision") or {}).get("action"),
    }


def print_phases(res: dict[str, Any]) -> None:
    print(f"\n{res['label']}: {res['bars']} bars, wall {res['wall_s']:.1f} s, peak RSS {res['peak_rss_mb']} MB")
    print(f"{'#':>3} {'phase':<22} {'seconds':>9}")
    for n, name, sec in res["phases"]:
        print(f"{n:>3} {name:<22} {sec:>9.1f}")
    print(f"    {'sum of phases':<22} {sum(s for _, _, s in res['phases']):>9.1f}")
    print(f"signal study: {res['signal_trials']} trials ({res['signal_pruned']} pruned), best objective "
          f"{res['signal_best_value']}; position best {res['position_best_value']}; OOS score {res['oos_score']}, "
          f"holdout score {res['holdout_score']}; decision {res['decision']}")


def _quality(fast: dict[str, Any], ref: dict[str, Any], tol_objective: float, tol_score: float) -> bool:
    """Print and return the quality comparison of a fast run with the reference (rule in the module docstring)."""
    d_obj = (fast["signal_best_value"] or 0.0) - (ref["signal_best_value"] or 0.0)
    d_score = (fast["oos_score"] or 0.0) - (ref["oos_score"] or 0.0)
    ok = d_obj >= -tol_objective and d_score >= -tol_score
    print(f"\nquality: best validation objective fast {fast['signal_best_value']:.4f} vs reference "
          f"{ref['signal_best_value']:.4f} (diff {d_obj:+.4f}, tolerance -{tol_objective}); "
          f"OOS score fast {fast['oos_score']:.4f} vs reference {ref['oos_score']:.4f} (diff {d_score:+.4f}, "
          f"tolerance -{tol_score}) -> {'OK' if ok else 'NOT OK'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["demo3y", "real", "scaling"], default="demo3y")
    ap.add_argument("--reference", action="store_true", help="also run and record the slow reference config")
    ap.add_argument("--trials", type=int, nargs=2, metavar=("SIGNAL", "POSITION"),
                    help="override the trial counts (default: the config's 100 / 50)")
    ap.add_argument("--tol-objective", type=float, default=0.01)
    ap.add_argument("--tol-score", type=float, default=0.25)
    ap.add_argument("--workdir", help="where the run roots go (default: a temp dir, removed afterwards)")
    args = ap.parse_args()

    trials = tuple(args.trials) if args.trials else None
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="weekly-bench-"))
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d %H:%M')}")
    cfg = load_config(REPO / "config.json")
    t = trials or (cfg.tuning.signal_trials, cfg.tuning.position_trials)
    grid = 1
    for b in (cfg.profile.confidence_threshold, cfg.profile.risk_percent, cfg.profile.sl_multiplier,
              cfg.profile.tp_multiplier):
        grid *= len(b.grid())
    grid *= len(cfg.profile.session_sets)
    print(f"workload: {args.workload}; trials signal={t[0]} position={t[1]}; moderate sweep grid {grid} points; "
          f"all 13 phases; fast config: labels.cusum_atr={cfg.labels.cusum_atr}, pruning on, "
          f"tuning.n_jobs={cfg.tuning.n_jobs}")
    try:
        if args.workload == "scaling":
            rows = []
            for years in (1, 2, 3):
                r = run_once(f"demo{years}y", _config(demo_bars=35_040 * years, trials=trials), None, tmp)
                print_phases(r)
                rows.append(r)
            print("\nscaling (demo):  years  bars     wall_s  s_per_10k_bars")
            for years, r in zip((1, 2, 3), rows, strict=True):
                print(f"                 {years:>5}  {r['bars']:>7}  {r['wall_s']:>6.1f}  "
                      f"{r['wall_s'] / r['bars'] * 1e4:>8.1f}")
            total = rows[-1]["wall_s"]
            peak = max(r["peak_rss_mb"] for r in rows)
            ref_file = REPO / "bench" / "reference_demo3y.json"
            ok = False
            if ref_file.exists():  # the 3-year point is the demo3y workload: compare it with its reference
                ok = _quality(rows[-1], json.loads(ref_file.read_text()), args.tol_objective, args.tol_score)
            else:
                print("no recorded demo3y reference: quality not compared (run --workload demo3y --reference)")
            print(f"total_s={total:.1f} peak_rss_mb={peak} quality_ok={str(ok).lower()}")
            return 0
        data = REAL if args.workload == "real" else None
        fast = run_once(f"{args.workload}-fast", _config(trials=trials), data, tmp)
        print_phases(fast)
        ref_file = REPO / "bench" / f"reference_{args.workload}.json"
        if args.reference or not ref_file.exists():
            if not args.reference:
                print(f"\nno recorded reference ({ref_file.name}); running it now (slow)")
            ref = run_once(f"{args.workload}-reference", _config(trials=trials, reference=True), data, tmp)
            print_phases(ref)
            ref["recorded"] = time.strftime("%Y-%m-%d %H:%M")
            ref_file.write_text(json.dumps(ref, indent=2) + "\n")
        else:
            ref = json.loads(ref_file.read_text())
            print(f"\nreference recorded {ref.get('recorded')}: wall {ref['wall_s']} s, best objective "
                  f"{ref['signal_best_value']}, OOS score {ref['oos_score']}")
        ok = _quality(fast, ref, args.tol_objective, args.tol_score)
        print(f"speed-up vs reference: {ref['wall_s'] / fast['wall_s']:.1f}x")
        print(f"total_s={fast['wall_s']:.1f} peak_rss_mb={fast['peak_rss_mb']} quality_ok={str(ok).lower()}")
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
