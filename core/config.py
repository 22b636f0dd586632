"""The config.json schema and loader: the only module that knows the configuration's keys.

Why one schema: a typo in a key or a value outside the active risk profile must stop every script before anything is
written (freqtrade validates its whole configuration at start-up for the same reason). Secrets never live here: they
come from the environment or a ``.env`` file through :func:`secrets`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import UserError

SESSIONS: dict[str, tuple[int, int]] = {
    # UTC hours [start, end) of the main FX/crypto sessions; overlaps follow from these.
    "asia": (0, 8),
    "london": (7, 16),
    "new_york": (13, 22),
}
Session = Literal["asia", "london", "new_york"]
PARAM_NAMES = ("confidence_threshold", "risk_percent", "sl_multiplier", "tp_multiplier")

PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    """Every section: unknown keys refused, no coercion, finite numbers only.

    Why strict: ``"risk_percent": "1.0"`` or ``"oos_weeks": true`` read as 1.0 / 1 is a silent change of meaning
    (a set scored on a one-week window was committed that way), and ``Infinity`` runs all 13 phases before it
    breaks the backtest. A number must be written as a JSON number; an int field does not take ``1.0`` or ``true``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class Bounds(_Strict):
    """Inclusive search bounds with a grid step, used by the sweep and by the active-value check."""

    min: float
    max: float
    step: PosFloat

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self

    def grid(self) -> list[float]:
        """The grid min, min+step, ..., max (rounded to kill float noise)."""
        n = int(round((self.max - self.min) / self.step))
        vals = (round(self.min + i * self.step, 10) for i in range(n + 1))
        return [v for v in vals if v <= self.max + 1e-9]

    def contains(self, value: float) -> bool:
        return self.min - 1e-9 <= value <= self.max + 1e-9


class RiskProfile(_Strict):
    """Bounds for the tunable trading parameters plus the absolute floors of the commit gate."""

    confidence_threshold: Bounds
    risk_percent: Bounds
    sl_multiplier: Bounds
    tp_multiplier: Bounds
    session_sets: list[list[Session]] = Field(min_length=1)
    min_trades: Annotated[int, Field(ge=1)] = 30
    max_drawdown_pct: Annotated[float, Field(gt=0, le=100)] = 20.0
    min_score: float = 0.0  # gate floor: the new set's OOS score must exceed it (0 = it must make money)


class Trading(_Strict):
    """The active trading parameters the live bot uses (the sweep changes the first five)."""

    confidence_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    risk_percent: Annotated[float, Field(gt=0, le=10)] = 1.0
    sl_multiplier: Annotated[float, Field(gt=0, le=10)] = 1.0
    tp_multiplier: Annotated[float, Field(gt=0, le=10)] = 1.0
    sessions: list[Session] = Field(default_factory=lambda: ["asia", "london", "new_york"], min_length=1)
    fixed_sl_atr: Annotated[float, Field(gt=0, le=20)] = 1.5
    fixed_tp_atr: Annotated[float, Field(gt=0, le=40)] = 2.0
    max_holding_bars: Annotated[int, Field(ge=1, le=2000)] = 32
    exit_threshold: Annotated[float, Field(gt=0, le=1)] = 0.6
    risk_multiplier_min: Annotated[float, Field(gt=0, le=1)] = 0.25
    risk_multiplier_max: Annotated[float, Field(ge=1, le=4)] = 1.5
    initial_equity: PosFloat = 10_000.0


class Breakers(_Strict):
    daily_loss_limit_pct: Annotated[float, Field(gt=0, le=100)] = 3.0
    max_consecutive_losses: Annotated[int, Field(ge=1)] = 5
    cooldown_bars: Annotated[int, Field(ge=0)] = 16
    max_drawdown_halt_pct: Annotated[float, Field(gt=0, le=100)] = 25.0
    max_spread_points: PosFloat = 5000.0


class Costs(_Strict):
    commission_per_lot: NonNegFloat = 5.0  # account currency per lot per side
    slippage_points: NonNegFloat = 100.0  # in points (symbol.point)
    default_spread_points: NonNegFloat = 1500.0  # used when the candles carry no spread


class SymbolSpec(_Strict):
    contract_size: PosFloat = 1.0
    point: PosFloat = 0.01
    volume_min: PosFloat = 0.01
    volume_step: PosFloat = 0.01
    volume_max: PosFloat = 100.0

    @model_validator(mode="after")
    def _volumes(self) -> SymbolSpec:
        if self.volume_max < self.volume_min:
            raise ValueError("volume_max must be >= volume_min")
        return self


class DataCfg(_Strict):
    """Where candles come from and what the validator accepts."""

    source: Literal["auto", "mt5", "file", "demo"] = "auto"
    file: str | None = None
    history_days: Annotated[int, Field(ge=30, le=3650)] = 1095
    max_gap_minutes: Annotated[int, Field(ge=15)] = 120
    market_closures: Literal["none", "weekends"] = "none"
    # With market_closures="weekends" (FX/CFD hours): a weekday closure (holiday, broker outage) up to this long is
    # reported and kept, and a weekend closure may run this much past three days (e.g. New Year on a Monday).
    max_closure_gap_minutes: Annotated[int, Field(ge=15, le=10_080)] = 1440
    server_timezone: str = "Europe/Athens"  # EET/EEST: the usual MT5 server clock (UTC+2 / UTC+3 with EU DST)
    spike_sigma: PosFloat = 12.0
    demo_seed: int = 7
    demo_bars: Annotated[int, Field(ge=1000)] = 105_120
    mt5_host: str = "127.0.0.1"
    mt5_port: Annotated[int, Field(ge=1, le=65535)] = 18812
    # A Parquet candle file (or the store) with more rows than this is refused from its metadata, before reading:
    # a few MB of Parquet can expand to tens of millions of rows and GBs of memory. 5M M15 bars = 140 years.
    max_rows: Annotated[int, Field(ge=1000)] = 5_000_000


class LabelsCfg(_Strict):
    horizon_bars: Annotated[int, Field(ge=1, le=500)] = 16
    pt_atr: PosFloat = 2.0
    sl_atr: PosFloat = 1.5
    cusum_atr: NonNegFloat = 0.0  # 0 = every bar is a sample; >0 = CUSUM event filter threshold in ATR units


class SplitsCfg(_Strict):
    oos_weeks: Annotated[int, Field(ge=1, le=104)] = 12
    sweep_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.7
    embargo_bars: Annotated[int, Field(ge=0)] = 32
    n_folds: Annotated[int, Field(ge=2, le=20)] = 3
    calibration_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.15


class FeaturesCfg(_Strict):
    calendar_csv: str | None = None
    protected: list[str] = Field(
        default_factory=lambda: [
            "sess_asia", "sess_london", "sess_new_york", "sess_overlap",
            "hour_sin", "hour_cos", "dow_sin", "dow_cos",
            "news_min_to_next", "news_min_since_last", "news_blackout",
        ]
    )
    news_blackout_minutes: Annotated[int, Field(ge=0)] = 30


class TuningCfg(_Strict):
    seed: int = 42
    signal_trials: Annotated[int, Field(ge=1)] = 100
    position_trials: Annotated[int, Field(ge=1)] = 50
    timeout_s: PosFloat | None = None
    n_jobs: Annotated[int, Field(ge=1)] = 1
    pruning: bool = True  # fold-wise pruning of the signal study; off = the slow reference of bench/weekly_run.py
    pruner: Literal["median", "wilcoxon"] = "median"  # which fold-wise pruner when pruning is on (README)
    warm_start_trials: Annotated[int, Field(ge=0, le=50)] = 5  # best sets of last week's study enqueued; 0 = cold


class HubCfg(_Strict):
    repo_id: str | None = None  # e.g. "me/btcusd-bot"; None = local registry folder
    endpoint: str | None = None  # None = HF_ENDPOINT or huggingface.co
    private: bool = True
    local_registry: str = "registry"
    retries: Annotated[int, Field(ge=0, le=10)] = 3


class TelegramCfg(_Strict):
    base_url: str | None = None  # None = https://api.telegram.org/bot ; a self-hosted Bot API server works too
    parse_mode: Literal["MarkdownV2", "HTML", "none"] = "MarkdownV2"
    timeout_s: PosFloat = 20.0


class GateCfg(_Strict):
    """The commit gate beyond the seed's 2 % rule and the profile's floors (``backtest.metrics.gate``).

    ``mode = "seed"`` selects the seed's gate alone (for comparisons, e.g. the replay); ``"default"`` also requires
    the evidence that knows how much the run searched (defaults and how they were chosen: README, "The gate")."""

    mode: Literal["default", "seed"] = "default"
    min_prob_better: Annotated[float, Field(ge=0, le=1)] = 0.90  # paired block bootstrap, full OOS window
    min_dsr: Annotated[float, Field(ge=0, le=1)] = 0.50  # deflated Sharpe ratio of the new set on the OOS window
    max_pbo: Annotated[float, Field(ge=0, le=1)] = 0.50  # probability of backtest overfitting of the sweep (CSCV)
    holdout_not_worse: bool = True  # holdout score >= the deployed set's (>= 0 on a first run)
    bootstrap_resamples: Annotated[int, Field(ge=1000, le=200_000)] = 5000
    bootstrap_seed: int = 0
    pbo_blocks: Annotated[int, Field(ge=4, le=20, multiple_of=2)] = 16


class PipelineCfg(_Strict):
    gate_improvement: Annotated[float, Field(ge=0, le=1)] = 0.02
    gate: GateCfg = Field(default_factory=GateCfg)
    keep_backups: Annotated[int, Field(ge=1, le=100)] = 5
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 500
    # a deploy also commits config.json + models/manifest.json in the root's git work tree (run id and scores in the
    # message; a rollback commits nothing). None (default) = on when the root is a git work tree.
    git_commit: bool | None = None


class Config(_Strict):
    """The whole config.json."""

    symbol: str = "BTCUSD"
    timeframe: Literal["M15"] = "M15"
    risk_profile: Literal["conservative", "moderate", "aggressive"] = "moderate"
    profiles: dict[Literal["conservative", "moderate", "aggressive"], RiskProfile]
    trading: Trading = Field(default_factory=Trading)
    breakers: Breakers = Field(default_factory=Breakers)
    costs: Costs = Field(default_factory=Costs)
    symbol_spec: SymbolSpec = Field(default_factory=SymbolSpec)
    data: DataCfg = Field(default_factory=DataCfg)
    labels: LabelsCfg = Field(default_factory=LabelsCfg)
    splits: SplitsCfg = Field(default_factory=SplitsCfg)
    features: FeaturesCfg = Field(default_factory=FeaturesCfg)
    tuning: TuningCfg = Field(default_factory=TuningCfg)
    hub: HubCfg = Field(default_factory=HubCfg)
    telegram: TelegramCfg = Field(default_factory=TelegramCfg)
    pipeline: PipelineCfg = Field(default_factory=PipelineCfg)

    @model_validator(mode="after")
    def _active_within_profile(self) -> Config:
        if self.risk_profile not in self.profiles:
            raise ValueError(f"risk_profile '{self.risk_profile}' is not defined under profiles")
        prof = self.profiles[self.risk_profile]
        for name in PARAM_NAMES:
            b: Bounds = getattr(prof, name)
            v = getattr(self.trading, name)
            if not b.contains(v):
                raise _BoundsError(
                    f"trading.{name}={v} is outside the '{self.risk_profile}' profile's bounds [{b.min}, {b.max}]"
                )
        allowed = {tuple(sorted(s)) for s in prof.session_sets}
        if tuple(sorted(self.trading.sessions)) not in allowed:
            raise _BoundsError(
                f"trading.sessions={self.trading.sessions} is not one of the '{self.risk_profile}' profile's "
                f"session_sets {prof.session_sets}"
            )
        return self

    @property
    def profile(self) -> RiskProfile:
        """The active risk profile."""
        return self.profiles[self.risk_profile]


class _BoundsError(ValueError):
    pass


def default_profiles() -> dict[str, dict[str, Any]]:
    """The three shipped risk profiles (also written into the default config.json)."""

    def b(lo: float, hi: float, st: float) -> dict[str, float]:
        return {"min": lo, "max": hi, "step": st}

    all3 = ["asia", "london", "new_york"]
    return {
        "conservative": {
            "confidence_threshold": b(0.50, 0.70, 0.05), "risk_percent": b(0.25, 0.75, 0.25),
            "sl_multiplier": b(0.8, 1.2, 0.2), "tp_multiplier": b(0.8, 1.2, 0.2),
            "session_sets": [all3, ["london", "new_york"]], "min_trades": 20, "max_drawdown_pct": 10.0,
        },
        "moderate": {
            "confidence_threshold": b(0.40, 0.65, 0.05), "risk_percent": b(0.5, 1.5, 0.5),
            "sl_multiplier": b(0.8, 1.4, 0.2), "tp_multiplier": b(0.8, 1.4, 0.2),
            "session_sets": [all3, ["london", "new_york"], ["asia", "london"]],
            "min_trades": 30, "max_drawdown_pct": 20.0,
        },
        "aggressive": {
            "confidence_threshold": b(0.35, 0.60, 0.05), "risk_percent": b(1.0, 3.0, 0.5),
            "sl_multiplier": b(0.6, 1.6, 0.2), "tp_multiplier": b(0.8, 2.0, 0.2),
            "session_sets": [all3, ["london", "new_york"]], "min_trades": 30, "max_drawdown_pct": 35.0,
        },
    }


def default_config() -> Config:
    """The schema's defaults: what ``build_features(candles, None)`` and the demo use."""
    return Config(profiles=default_profiles())  # type: ignore[arg-type]


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")


def _describe(err: dict[str, Any]) -> str:
    typ = err.get("type", "")
    ctx = err.get("ctx") or {}
    if typ == "extra_forbidden":
        return "unknown key"
    if typ in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        ops = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
        bound = next(iter(ctx.values()), "?")
        return f"value {err.get('input')!r} out of range: must be {ops[typ]} {bound}"
    if typ == "literal_error":
        return f"value {err.get('input')!r} not allowed: expected {ctx.get('expected', '?')}"
    if typ == "value_error":
        return str(ctx.get("error", err.get("msg", "")))
    if typ in {"int_type", "float_type", "bool_type", "string_type", "list_type", "dict_type", "model_type"}:
        want = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
                "string_type": "a string", "list_type": "a list", "dict_type": "an object",
                "model_type": "an object"}[typ]
        return f"expected {want}, got {_json_kind(err.get('input'))} {_show(err.get('input'))} (no conversion is done)"
    if typ == "finite_number":
        return f"value {err.get('input')!r} is not a finite number (NaN and Infinity are refused)"
    return f"{err.get('msg', typ)} (got {err.get('input')!r})"


def _show(v: Any) -> str:
    """A value as it is written in the JSON file (``true``, ``"1.0"``), for the error line."""
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if v is None:
        return "null"
    return "a list" if isinstance(v, list) else "an object" if isinstance(v, dict) else type(v).__name__


def parse_config(raw: dict[str, Any], source: str = "config.json") -> Config:
    """Validate a mapping; any problem becomes one :class:`UserError` line naming the file and key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _loc(err)
        msg = _describe(err)
        where = f"{source}: {loc}: " if loc else f"{source}: "
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise UserError(f"{where}{msg}{more}") from None


class _JsonRefused(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a key given twice is refused (``json`` would silently keep the last one)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            others = ", ".join(list(out)[:4])
            raise _JsonRefused(f"key '{k}' is given twice in the same object (beside {others})")
        out[k] = v
    return out


def read_json_strict(path: str | os.PathLike[str], what: str = "config file") -> Any:
    """Parse a JSON file strictly: readable UTF-8 text, no duplicate keys, no NaN/Infinity.

    Every failure (missing, a folder, unreadable, binary garbage, invalid JSON) is one :class:`UserError` line
    naming the file, so the scripts exit 2 before doing anything."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: {what} not found")
    if p.is_dir():
        raise UserError(f"{p}: is a folder, expected a JSON {what}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserError(f"{p}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not a text file (byte {exc.start} is not UTF-8): expected JSON") from None
    if "\x00" in text:
        raise UserError(f"{p}: not a text file (contains NUL bytes): expected JSON")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _JsonRefused as exc:
        raise UserError(f"{p}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise UserError(f"{p}: invalid JSON: nested too deeply") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Load and validate config.json. A missing, unreadable or non-JSON file or a schema violation raises
    :class:`UserError` (one line naming the file and the key)."""
    p = Path(path)
    raw = read_json_strict(p)
    if not isinstance(raw, dict):
        raise UserError(f"{p}: top level must be a JSON object")
    return parse_config(raw, str(p))


def config_to_json(cfg: Config) -> str:
    """Canonical JSON text of a config (sorted keys are NOT used: the file keeps the schema's order)."""
    return json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n"


def with_trading(cfg: Config, **changes: Any) -> Config:
    """A copy of ``cfg`` with some trading parameters replaced (re-validated against the profile)."""
    raw = cfg.model_dump(mode="json")
    raw["trading"].update(changes)
    return parse_config(raw, "trading override")


# --------------------------------------------------------------------------------------------------- secrets
SECRET_NAMES = (
    "MT5_LOGIN", "MT5_PASSWORD", "MT5_SERVER", "MT5_PATH",
    "HF_TOKEN", "TELEGRAM_TOKEN", "TELEGRAM_CHAT_ID", "MODEL_SIGNING_KEY",
)


def load_dotenv_file(root: str | os.PathLike[str]) -> None:
    """Read ``root/.env`` into the environment (existing variables win). Never writes anything."""
    env = Path(root) / ".env"
    if env.exists():
        from dotenv import load_dotenv

        load_dotenv(env, override=False)


def secrets(names: Iterable[str] = SECRET_NAMES) -> dict[str, str]:
    """The secrets that are set, from the environment only (call :func:`load_dotenv_file` first)."""
    return {n: os.environ[n] for n in names if os.environ.get(n)}


_URL_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):(?P<pw>[^@/\s'\"]+)@")


def redact_url(url: str) -> str:
    """``scheme://user:PASSWORD@host/db`` -> ``scheme://user:***@host/db`` (every URL in ``url``)."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('head')}:***@", url)


def redact(text: str) -> str:
    """Replace every secret value that occurs in ``text`` by ``***`` (for logs and reports), and the password of
    every ``scheme://user:password@host`` URL (a ``--storage`` database URL must not reach a report or a log).

    Numeric secrets (an MT5 login, a Telegram chat id) are replaced only where they stand alone, never inside a
    longer number (``4242`` must not turn ``0.42421`` into ``0.***1``)."""
    text = redact_url(text)
    for value in secrets().values():
        if len(value) < 4:
            continue
        if value.isdigit():
            text = re.sub(rf"(?<![\d.]){re.escape(value)}(?![\d.])", "***", text)
        else:
            text = text.replace(value, "***")
    return text
