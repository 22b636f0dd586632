"""``shap-report`` (``python ml/shap_analysis.py``): SHAP importances of the deployed signal models, on their own.

What phase 4 of the weekly run does, for a human who wants to look now: explain the three deployed signal models
(RF, XGBoost, LightGBM) on a seeded sample of the training window's rows, compare the ranks with an earlier report,
and write ``shap_importance.csv``, ``shap_report.json`` and ``shap_importance.png`` to ``--out`` (default
``<root>/results/shap-<UTC time>/``). Nothing else changes: this reads ``models/`` and the candles, it deploys nothing.

    shap-report --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python ml/shap_analysis.py --root /tmp/run1 --demo --rows 500
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cli.common import build_parser, config_of, run, start
from core.paths import Paths


def newest_report(paths: Paths) -> Path | None:
    """The most recent ``shap_importance.csv`` under ``results/`` (a weekly run's or an earlier shap-report's)."""
    found = [*paths.results.glob("*/shap/shap_importance.csv"), *paths.results.glob("shap-*/shap_importance.csv")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def main(argv: list[str] | None = None) -> int:
    ap = build_parser(__doc__, ["root", "data", "demo", "config", "models", "out"], prog="shap-report",
                      overrides={"out": {"help": "output folder (default: <root>/results/shap-<UTC time>/)"}})
    ap.add_argument("--previous", metavar="CSV", help="shap_importance.csv of an earlier report to compare ranks "
                    "with (default: the newest under <root>/results/)")
    ap.add_argument("--rows", type=int, default=2000, help="rows explained for the boosters (default %(default)s)")
    ap.add_argument("--rf-rows", type=int, default=500, help="rows explained for the forest (default %(default)s)")
    args = ap.parse_args(argv)
    paths = start(args)
    cfg = config_of(args, paths)

    from market.data import load_candles
    from market.dataset import build_dataset
    from ml.models.manifest import SIGNAL_KEYS, load_model, require
    from ml.models.signal import SIGNAL_MODELS, underlying
    from ml.shap_analysis import shap_report

    models_dir = Path(args.models) if args.models else paths.models
    require(models_dir, SIGNAL_KEYS, "the SHAP report")  # one line, before any data is loaded
    candles = load_candles(cfg, paths, args.data, args.demo)
    ds = build_dataset(candles, cfg)
    models = {m: underlying(load_model(models_dir, f"signal_{m}", ds.feature_names)) for m in SIGNAL_MODELS}
    out = Path(args.out) if args.out else paths.results / f"shap-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    previous = Path(args.previous) if args.previous else newest_report(paths)
    rep = shap_report(models, ds.X[ds.splits.train], ds.feature_names, cfg.features.protected, out,
                      previous=previous, seed=cfg.tuning.seed, sample=args.rows, rf_sample=args.rf_rows)

    tag = "DEMO " if ds.is_demo else ""
    rows = ", ".join(f"{m} {n}" for m, n in rep["n_rows"].items())
    print(f"{tag}SHAP on training rows ({rows}), {rep['n_features']} features; mean rank agreement "
          f"{rep['mean_rank_agreement']}; compared with {rep['previous'] or 'no earlier report'}")
    for f in rep["features"][:10]:
        protected = "  (protected)" if f["protected"] else ""
        print(f"{tag}  {f['rank']:>2} {f['feature']:<28} {f['mean_share']:.3f}{protected}")
    for line in rep["warnings"]:
        print(f"{tag}warning: {line}")
    print("\n".join(f"{k}: {v}" for k, v in rep["files"].items()))
    return 0


def entry() -> None:
    """``shap-report`` (installed command) and ``python ml/shap_analysis.py``."""
    run(main)
