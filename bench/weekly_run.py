#!/usr/bin/env python
"""Benchmark of the whole weekly run (issue: 120 s on 2 cores, <= 2 GB, quality kept, warm start measured).

Workloads (printed in the output):

* ``demo3y``: the demo generator's default, 105,120 M15 bars (~3 years), all 13 phases, the config's default trial
  counts (100 signal, 50 position), the moderate profile's full sweep grid;
* ``real``: ``../shared/data/BTCUSDT_15m_2023_2024.csv`` (70,175 real bars), same settings;
* ``scaling``: the demo for 1, 2 and 3 years side by side (cost should grow about linearly in bars);
* ``quick``: ``weekly_optimize.py --quick`` on the demo (the replay's unit; target 45 s).

Each run is ``scripts/weekly_optimize.py`` in a fresh root, as a child process; its process tree's resident memory
is sampled from /proc every 0.2 s (peak = the largest sum over all its processes). CPU seconds (user + sys of every
process of the tree, from the same samples; at least ``RUSAGE_CHILDREN``, which misses the signal study's worker
processes because the run does not wait for them itself) are printed next to the wall time,
and the 1-minute load average at the start and the end: on a shared machine the wall time is inflated by other
work, the CPU time much less, so the two together say what the run costs. The per-phase table comes from the run's
own report.json.

Quality: the *reference* configuration (no pruning, no CUSUM event subsampling, cold start, the same trial counts)
is run once per workload and recorded under ``bench/reference_<workload>.json`` (``--reference`` to (re)make it).
The fast configuration passes when

* its best validation objective is within ``--tol-objective`` (absolute, default 0.01 = one point of F1 x (1 - DD))
  of the reference's, and
* its final OOS score is not below the reference's by more than a DERIVED tolerance: the noise of that score,
  estimated by a circular block bootstrap (blocks of ``--block-days`` days, 2,000 resamples, seeded) of the fast
  run's OOS daily returns (realised equity per UTC day, from ``trades_new.csv``; days without a closed trade return
  0). Each resample is scored with the same formula as the run (return % / max(max DD %, 1) x trade factor) on its
  daily equity curve; the tolerance is 1.645 x the standard deviation of those scores (a one-sided 95 % band).

Warm start (``--warm``, on by default for demo3y/real): a run one week EARLIER (the same source without its last
672 bars) is made first in a root whose ``results/optuna.db`` the next run shares; then the same week as the fast
run is repeated in that root, so its studies enqueue the best sets of the earlier week's studies. Warm and cold
(the fast run, a fresh root) are printed side by side. The last line is
``total_s=<float> peak_rss_mb=<int> quality_ok=<true|false> speedup_vs_reference=<float>`` (total_s = the fast
cold run; the warm run's time is printed above it).

    python bench/weekly_run.py                      # demo3y, compare with the recorded reference, warm vs cold
    python bench/weekly_run.py --workload real
    python bench/weekly_run.py --workload scaling
    python bench/weekly_run.py --workload quick
    python bench/weekly_run.py --reference          # run + record the slow reference too (long)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.config import config_to_json, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent

REAL = REPO.parent / "shared" / "data" / "BTCUSDT_15m_2023_2024.csv"
PAGE = os.sysconf("SC_PAGE_SIZE")


TICK = os.sysconf("SC_CLK_TCK")


def _tree_sample(root_pid: int) -> tuple[int, dict[int, float]]:
    """(sum of RSS in bytes, CPU seconds user + sys per pid) of ``root_pid`` and all its descendants, from /proc.

    Why the CPU per process: the signal study fits its models in worker processes started by a forkserver, which
    ``RUSAGE_CHILDREN`` never counts (the run does not wait for them itself)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                parts = fh.read().rsplit(")", 1)[1].split()
            ppid = int(parts[1])
            cpu[int(d)] = (int(parts[11]) + int(parts[12])) / TICK  # utime, stime (fields 14, 15 of stat)
            with open(f"/proc/{d}/statm") as fh:
                rss[int(d)] = int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, stack, seen = 0, [root_pid], {}
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        if p in cpu:
            seen[p] = cpu[p]
        stack.extend(children.get(p, []))
    return total, seen


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
        raw["tuning"]["warm_start_trials"] = 0
    return config_to_json(parse_config(raw))


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_once(label: str, config_text: str, data: Path | None, workdir: Path, *, root: Path | None = None,
             quick: bool = False) -> dict[str, Any]:
    """One whole weekly run (in a fresh root, or in ``root`` as it is: a later week of the same bot); returns
    timings (wall, CPU, load), memory, objective and score."""
    if root is None:
        root = workdir / label
        if root.exists():
            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(config_text)
    before = set((root / "results").glob("*/report.json")) if (root / "results").exists() else set()
    cmd = [sys.executable, str(REPO / "scripts" / "weekly_optimize.py"), "--root", str(root)]
    cmd += ["--data", str(data)] if data else ["--demo"]
    cmd += ["--quick"] if quick else []
    log = (root / f"run-{label}.log").open("w")
    load0 = os.getloadavg()[0]
    cpu0 = _cpu_children()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    peak = 0
    stop = threading.Event()

    tree_cpu: dict[int, float] = {}

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            rss, cpu_now = _tree_sample(proc.pid)
            peak = max(peak, rss)
            tree_cpu.update(cpu_now)
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    cpu = _cpu_children() - cpu0
    stop.set()
    th.join()
    cpu = max(cpu, sum(tree_cpu.values()))  # the forkserver's workers are not in RUSAGE_CHILDREN
    log.close()
    if rc != 0:
        tail = (root / f"run-{label}.log").read_text()[-3000:]
        raise SystemExit(f"{label}: weekly_optimize.py exited {rc}\n{tail}")
    rep_path = sorted(set((root / "results").glob("*/report.json")) - before)[-1]
    rep = json.loads(rep_path.read_text())
    phases = [(p["number"], p["name"], float(p.get("seconds") or 0.0)) for p in
              sorted(rep["phases"], key=lambda p: p["number"])]
    ev = rep.get("evaluation") or {}
    sig = rep.get("optuna_signal") or {}
    return {
        "label": label, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_start": round(load0, 2),
        "load_end": round(os.getloadavg()[0], 2), "peak_rss_mb": int(peak / 2**20), "phases": phases,
        "bars": (rep.get("data") or {}).get("rows"),
        "signal_best_value": sig.get("best_value"), "signal_trials": sig.get("n_trials"),
        "signal_pruned": sig.get("n_pruned"), "signal_study": sig.get("study"),
        "signal_predecessor": sig.get("predecessor"), "signal_warm_start": sig.get("warm_start"),
        "position_best_value": (rep.get("optuna_position") or {}).get("best_value"),
        "oos_score": (ev.get("new_full") or {}).get("score"),
        "oos_trades": (ev.get("new_full") or {}).get("trades"),
        "holdout_score": (ev.get("new_holdout") or {}).get("score"),
        "decision": (rep.get("decision") or {}).get("action"),
        "run_dir": str(rep_path.parent),
    }


def print_phases(res: dict[str, Any]) -> None:
    cpu = res.get("cpu_s", float("nan"))
    print(f"\n{res['label']}: {res['bars']} bars, wall {res['wall_s']:.1f} s, CPU {cpu:.1f} s "
          f"(user+sys), load {res.get('load_start', '?')} -> {res.get('load_end', '?')}, peak RSS "
          f"{res['peak_rss_mb']} MB")
    print(f"{'#':>3} {'phase':<22} {'seconds':>9}")
    for n, name, sec in res["phases"]:
        print(f"{n:>3} {name:<22} {sec:>9.1f}")
    print(f"    {'sum of phases':<22} {sum(s for _, _, s in res['phases']):>9.1f}")
    print(f"signal study: {res['signal_trials']} trials ({res['signal_pruned']} pruned), best objective "
          f"{res['signal_best_value']}; position best {res['position_best_value']}; OOS score {res['oos_score']}, "
          f"holdout score {res['holdout_score']}; decision {res['decision']}")


def _daily_score(r: np.ndarray, trade_factor: float) -> np.ndarray:
    """The run's score formula on daily equity curves (rows of compounded daily returns ``r``)."""
    eq = np.cumprod(1.0 + r, axis=-1)
    ret = (eq[..., -1] - 1.0) * 100.0
    peak = np.maximum.accumulate(np.maximum(eq, 1.0), axis=-1)
    dd = np.max((peak - eq) / peak, axis=-1) * 100.0
    s = ret / np.maximum(dd, 1.0)
    return np.where(ret > 0, s * trade_factor, s)


def oos_noise(run_dir: Path, initial_equity: float, min_trades: int, block_days: int = 5, n_boot: int = 2000,
              seed: int = 0) -> dict[str, float]:
    """Bootstrap noise of the OOS score (module docstring): circular blocks of daily returns, 1.645 sigma."""
    tr = pd.read_csv(Path(run_dir) / "trades_new.csv", parse_dates=["entry_time", "exit_time"])
    if tr.empty:
        return {"days": 0, "sigma": float("nan"), "tolerance": float("nan"), "daily_score": float("nan")}
    day = pd.DatetimeIndex(tr["exit_time"]).floor("D")
    pnl = tr.groupby(day)["pnl"].sum()
    days = pd.date_range(pd.DatetimeIndex(tr["entry_time"]).floor("D").min(), day.max(), freq="D")
    pnl = pnl.reindex(days, fill_value=0.0).to_numpy()
    eq = initial_equity + np.cumsum(pnl)
    r = np.diff(np.r_[initial_equity, eq]) / np.r_[initial_equity, eq[:-1]]
    n = r.size
    factor = min(1.0, len(tr) / max(min_trades, 1))
    rng = np.random.default_rng(seed)
    n_blocks = -(-n // block_days)
    starts = rng.integers(0, n, size=(n_boot, n_blocks))
    idx = (starts[:, :, None] + np.arange(block_days)[None, None, :]).reshape(n_boot, -1)[:, :n] % n
    boot = _daily_score(r[idx], factor)
    sigma = float(np.std(boot, ddof=1))
    return {"days": int(n), "sigma": sigma, "tolerance": 1.645 * sigma,
            "daily_score": float(_daily_score(r[None, :], factor)[0]), "q05": float(np.quantile(boot, 0.05)),
            "q95": float(np.quantile(boot, 0.95))}


def _quality(fast: dict[str, Any], ref: dict[str, Any], tol_objective: float, noise: dict[str, float],
             workload: str) -> bool:
    """Print and return the quality comparison of a fast run with the reference (rule in the module docstring)."""
    d_obj = (fast["signal_best_value"] or 0.0) - (ref["signal_best_value"] or 0.0)
    d_score = (fast["oos_score"] or 0.0) - (ref["oos_score"] or 0.0)
    tol = noise["tolerance"]
    ok_obj = d_obj >= -tol_objective
    ok_score = bool(np.isfinite(tol)) and d_score >= -tol
    print(f"\nquality ({workload}): best validation objective fast {fast['signal_best_value']:.4f} vs reference "
          f"{ref['signal_best_value']:.4f} (diff {d_obj:+.4f}, tolerance -{tol_objective}) -> "
          f"{'OK' if ok_obj else 'NOT OK'}")
    print(f"  OOS score noise: block bootstrap of the fast run's {noise['days']} OOS daily returns (5-day blocks, "
          f"2000 resamples): score on the daily curve {noise['daily_score']:.3f}, sigma {noise['sigma']:.3f}, "
          f"90% band [{noise.get('q05', float('nan')):.3f}, {noise.get('q95', float('nan')):.3f}] -> derived "
          f"tolerance 1.645 sigma = {tol:.3f}")
    print(f"  OOS score fast {fast['oos_score']:.4f} vs reference {ref['oos_score']:.4f} (diff {d_score:+.4f}, "
          f"tolerance -{tol:.3f}) -> {'OK' if ok_score else 'NOT OK'}"
          f" (a fixed 0.25 would say {'OK' if d_score >= -0.25 else 'NOT OK'})")
    return ok_obj and ok_score


def _week_earlier(data: Path | None, workdir: Path, cfg_text: str) -> Path:
    """The same source one week earlier (its last 672 M15 bars dropped), as a parquet file for ``--data``."""
    from core.config import parse_config as _parse
    from market.data.demo import demo_candles
    from market.data.sources import read_file

    cfg = _parse(json.loads(cfg_text))
    frame = read_file(data, cfg) if data else demo_candles(cfg)
    out = workdir / "week_earlier.parquet"
    frame.iloc[:-672].reset_index().to_parquet(out)
    return out


def _warm_vs_cold(cold: dict[str, Any], data: Path | None, workdir: Path, cfg_text: str, label: str
                  ) -> dict[str, Any]:
    """Week k-1 in a root, then week k in the same root (warm); printed beside the cold run."""
    root = workdir / f"{label}-warm-root"
    if root.exists():
        shutil.rmtree(root)
    prev = run_once(f"{label}-week-earlier", cfg_text, _week_earlier(data, workdir, cfg_text), workdir, root=root)
    print_phases(prev)
    warm = run_once(f"{label}-warm", cfg_text, data, workdir, root=root)
    print_phases(warm)
    print(f"\nwarm vs cold (same data, same trials; warm = the study enqueued the best "
          f"{(warm.get('signal_warm_start') or {}).get('enqueued', 0)} sets of {warm.get('signal_predecessor')}):")
    print(f"  {'':<28}{'cold':>12}{'warm':>12}")
    rows = [("wall s", "wall_s"), ("CPU s", "cpu_s"), ("signal study s", None), ("signal best objective",
            "signal_best_value"), ("signal trials pruned", "signal_pruned"), ("position best", "position_best_value"),
            ("OOS score", "oos_score"), ("decision", "decision")]
    for name, key in rows:
        if key is None:
            c = next(s for n, _, s in cold["phases"] if n == 5)
            w = next(s for n, _, s in warm["phases"] if n == 5)
        else:
            c, w = cold.get(key), warm.get(key)
        fmt = (lambda v: f"{v:>12.4f}" if isinstance(v, float) else f"{v!s:>12}")  # noqa: E731
        print(f"  {name:<28}{fmt(c)}{fmt(w)}")
    print(f"  lineage: {warm.get('signal_study')} <- {warm.get('signal_predecessor')} (storage "
          f"{root / 'results' / 'optuna.db'})")
    return warm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["demo3y", "real", "scaling", "quick"], default="demo3y")
    ap.add_argument("--reference", action="store_true", help="also run and record the slow reference config")
    ap.add_argument("--trials", type=int, nargs=2, metavar=("SIGNAL", "POSITION"),
                    help="override the trial counts (default: the config's 100 / 50)")
    ap.add_argument("--tol-objective", type=float, default=0.01)
    ap.add_argument("--block-days", type=int, default=5, help="bootstrap block length of the OOS noise")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-vs-cold runs (two more runs)")
    ap.add_argument("--workdir", help="where the run roots go (default: a temp dir, removed afterwards)")
    args = ap.parse_args()

    trials = tuple(args.trials) if args.trials else None
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="weekly-bench-"))
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)")
    cfg = load_config(REPO / "config.json")
    t = trials or (cfg.tuning.signal_trials, cfg.tuning.position_trials)
    grid = 1
    for b in (cfg.profile.confidence_threshold, cfg.profile.risk_percent, cfg.profile.sl_multiplier,
              cfg.profile.tp_multiplier):
        grid *= len(b.grid())
    grid *= len(cfg.profile.session_sets)
    print(f"workload: {args.workload}; trials signal={t[0]} position={t[1]}; moderate sweep grid {grid} points; "
          f"all 13 phases; fast config: labels.cusum_atr={cfg.labels.cusum_atr}, pruning "
          f"{cfg.tuning.pruner if cfg.tuning.pruning else 'off'}, warm start {cfg.tuning.warm_start_trials} sets, "
          f"tuning.n_jobs={cfg.tuning.n_jobs}")
    try:
        if args.workload == "quick":
            r = run_once("quick", _config(), None, tmp, quick=True)
            print_phases(r)
            print(f"total_s={r['wall_s']:.1f} peak_rss_mb={r['peak_rss_mb']} cpu_s={r['cpu_s']:.1f}")
            return 0
        if args.workload == "scaling":
            rows = []
            for years in (1, 2, 3):
                r = run_once(f"demo{years}y", _config(demo_bars=35_040 * years, trials=trials), None, tmp)
                print_phases(r)
                rows.append(r)
            print("\nscaling (demo):  years  bars     wall_s  cpu_s  s_per_10k_bars(wall)  cpu_s_per_10k_bars")
            for years, r in zip((1, 2, 3), rows, strict=True):
                print(f"                 {years:>5}  {r['bars']:>7}  {r['wall_s']:>6.1f}  {r['cpu_s']:>6.1f}  "
                      f"{r['wall_s'] / r['bars'] * 1e4:>8.1f}  {r['cpu_s'] / r['bars'] * 1e4:>8.1f}")
            r = rows[-1]
            ref_file = REPO / "bench" / "reference_demo3y.json"
            ok, speed = False, float("nan")
            if ref_file.exists():  # the 3-year point is the demo3y workload: compare it with its reference
                ref = json.loads(ref_file.read_text())
                noise = oos_noise(Path(r["run_dir"]), cfg.trading.initial_equity, cfg.profile.min_trades,
                                  args.block_days)
                ok = _quality(r, ref, args.tol_objective, noise, "demo3y")
                speed = ref["wall_s"] / r["wall_s"]
            else:
                print("no recorded demo3y reference: quality not compared (run --workload demo3y --reference)")
            print(f"total_s={r['wall_s']:.1f} peak_rss_mb={max(x['peak_rss_mb'] for x in rows)} "
                  f"quality_ok={str(ok).lower()} speedup_vs_reference={speed:.2f}")
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
        noise = oos_noise(Path(fast["run_dir"]), cfg.trading.initial_equity, cfg.profile.min_trades, args.block_days)
        ok = _quality(fast, ref, args.tol_objective, noise, args.workload)
        speed = ref["wall_s"] / fast["wall_s"]
        print(f"speed-up vs reference (wall): {speed:.1f}x")
        if not args.no_warm:
            _warm_vs_cold(fast, data, tmp, _config(trials=trials), args.workload)
        slow = max(fast["phases"], key=lambda p: p[2])
        if fast["wall_s"] > 120:
            print(f"target 120 s missed: the largest phase is {slow[0]} {slow[1]} ({slow[2]:.1f} s of "
                  f"{fast['wall_s']:.1f} s; CPU {fast['cpu_s']:.1f} s for the whole run)")
        print(f"total_s={fast['wall_s']:.1f} peak_rss_mb={fast['peak_rss_mb']} quality_ok={str(ok).lower()} "
              f"speedup_vs_reference={speed:.2f}")
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
