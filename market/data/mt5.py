"""MetaTrader 5 bars: one code path for the ``MetaTrader5`` package (Windows) and the ``mt5linux`` bridge (Linux).

Why one path: ``mt5linux.MetaTrader5(host, port)`` is an rpyc client whose methods have the names and arguments of
the Windows module, so everything below talks to "an object with the MetaTrader5 API" and only :func:`connect`
knows which one it got. Tests run the real mt5linux client against a stand-in terminal served by ``rpyc_classic``.

What a fetch does: ``initialize`` with MT5_LOGIN / MT5_PASSWORD / MT5_SERVER (and MT5_PATH) from the environment,
``symbol_select``, ``symbol_info`` (the broker's contract spec, compared with config.json), ``copy_rates_range`` from
the last stored bar (or ``history_days`` back) to now, drop the still-forming bar, ``shutdown`` - always, also after
an error. Every failure is a :class:`~core.errors.UserError` naming the call and ``last_error()``; nothing is written
here, so the store stays as it was.

Time: MT5 bar times are epoch seconds of the broker's **server wall clock** (commonly EET/EEST, UTC+2/+3), whatever
the docs say. Requests are therefore sent as server wall time dressed as UTC, and answers are converted back with
``cfg.data.server_timezone`` (see :func:`market.data.sources.server_wall_to_utc` for the DST hour rules).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from core.config import Config, redact, secrets
from core.errors import UserError
from market.data.sources import BAR, COLUMNS, mt5_rates_to_frame, server_zone

TIMEFRAME_M15 = 15
_EPOCH = pd.Timestamp("1970-01-01")
_RATE_FIELDS = ("time",) + COLUMNS


@dataclass
class FetchResult:
    """Bars fetched from the terminal (UTC standard frame, forming bar removed) and what the terminal said."""

    frame: pd.DataFrame
    symbol_info: dict[str, Any]
    date_from: datetime  # as sent: server wall time dressed as UTC
    date_to: datetime
    forming_dropped: int = 0
    warnings: list[str] = field(default_factory=list)


def connect(cfg: Config) -> tuple[Any, str]:
    """The MetaTrader5 API object and a description of it: the Windows package, else the mt5linux bridge."""
    if sys.platform == "win32":
        try:
            import MetaTrader5 as mt5  # type: ignore[import-not-found]
        except ImportError:
            raise UserError("MT5: the MetaTrader5 package is not installed (pip install -r requirements.txt)") from None
        return mt5, "MetaTrader5 package"
    host, port = cfg.data.mt5_host, cfg.data.mt5_port
    try:
        from mt5linux import MetaTrader5
    except ImportError:
        raise UserError("MT5: the mt5linux package is not installed (pip install -r requirements.txt)") from None
    try:
        return MetaTrader5(host=host, port=port), f"mt5linux bridge {host}:{port}"
    except (OSError, EOFError) as exc:
        raise UserError(
            f"MT5: cannot reach the mt5linux bridge at {host}:{port} ({type(exc).__name__}: {exc}); "
            "start the terminal and `python -m mt5linux` under Wine, or set data.mt5_host / data.mt5_port"
        ) from None


def server_epoch(ts: pd.Timestamp, cfg: Config) -> int:
    """A UTC instant -> epoch seconds of the broker's wall clock (what MT5 bar times are)."""
    wall = ts.tz_convert(server_zone(cfg)).tz_localize(None)
    return int((wall - _EPOCH) // pd.Timedelta(seconds=1))


def _as_request(epoch: int) -> datetime:
    # mt5linux sends repr(dt.astimezone()): an aware datetime keeps its instant, so the terminal sees this epoch.
    return datetime.fromtimestamp(epoch, tz=UTC)


def _last_error(api: Any) -> str:
    try:
        err = api.last_error()
        return f"last_error()={tuple(err)!r}"
    except Exception as exc:  # the bridge itself broke
        return f"last_error() unavailable ({type(exc).__name__}: {exc})"


def _plain(info: Any) -> dict[str, Any]:
    """A symbol_info namedtuple (local, or an rpyc proxy of one) -> a plain dict of simple values."""
    raw = info._asdict() if hasattr(info, "_asdict") else info
    out: dict[str, Any] = {}
    for k in list(raw.keys()):
        v = raw[k]
        out[str(k)] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def _spec_warnings(info: dict[str, Any], cfg: Config) -> list[str]:
    """Differences between the broker's contract spec and config.json's symbol_spec (config is never rewritten)."""
    pairs = {
        "point": "point",
        "trade_contract_size": "contract_size",
        "volume_min": "volume_min",
        "volume_step": "volume_step",
        "volume_max": "volume_max",
    }
    out = []
    for broker_key, cfg_key in pairs.items():
        if broker_key in info and info[broker_key] is not None:
            ours = float(getattr(cfg.symbol_spec, cfg_key))
            theirs = float(info[broker_key])
            if not np.isclose(ours, theirs, rtol=1e-9, atol=0.0):
                out.append(f"config.json symbol_spec.{cfg_key}={ours:g} but the broker's {broker_key} is {theirs:g}")
    return out


def login_args() -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``initialize``'s ``(args, kwargs)`` from MT5_LOGIN / MT5_PASSWORD / MT5_SERVER / MT5_PATH (environment or
    .env); the data refresh and the live bot's order path log in the same way."""
    creds = secrets()
    login = creds.get("MT5_LOGIN")
    if not login:
        raise UserError(
            "MT5: MT5_LOGIN is not set (put MT5_LOGIN, MT5_PASSWORD, MT5_SERVER in the environment or .env)"
        )
    try:
        login_no = int(login)
    except ValueError:
        raise UserError("MT5: MT5_LOGIN must be the numeric account number") from None
    kwargs: dict[str, Any] = {"login": login_no, "password": creds.get("MT5_PASSWORD", ""),
                              "server": creds.get("MT5_SERVER", "")}
    args: tuple[Any, ...] = (creds["MT5_PATH"],) if creds.get("MT5_PATH") else ()
    return args, kwargs


def fetch(cfg: Config, since: pd.Timestamp | None = None, now: pd.Timestamp | None = None) -> FetchResult:
    """Completed M15 bars of ``cfg.symbol`` from the bar at ``since`` (UTC, inclusive; None = ``history_days``
    back) up to ``now`` (default: the clock). The terminal is always shut down again."""
    args, kwargs = login_args()
    login_no, server = kwargs["login"], kwargs["server"]
    now_utc = (now if now is not None else pd.Timestamp.now(tz="UTC")).tz_convert("UTC")
    start_utc = since if since is not None else now_utc - pd.Timedelta(days=cfg.data.history_days)
    symbol = cfg.symbol

    api, where = connect(cfg)
    step = "initialize"
    try:
        if not api.initialize(*args, **kwargs):
            raise UserError(
                f"MT5: initialize (login {login_no}, server {server!r}) via {where} failed: {_last_error(api)}"
            )
        step = "symbol_select"
        if not api.symbol_select(symbol, True):
            raise UserError(
                f"MT5: symbol_select({symbol!r}) failed: {_last_error(api)} "
                "(is the symbol spelled as the broker names it, e.g. BTCUSD.m?)"
            )
        step = "symbol_info"
        raw_info = api.symbol_info(symbol)
        if raw_info is None:
            raise UserError(f"MT5: symbol_info({symbol!r}) returned nothing: {_last_error(api)}")
        info = _plain(raw_info)
        step = "copy_rates_range"
        date_from = _as_request(server_epoch(start_utc, cfg))
        now_server = server_epoch(now_utc, cfg)
        date_to = _as_request(now_server)
        rates = api.copy_rates_range(symbol, TIMEFRAME_M15, date_from, date_to)
        range_error = _last_error(api)  # now, before the next call overwrites it
        window = f"{date_from:%Y-%m-%d %H:%M} .. {date_to:%Y-%m-%d %H:%M} server time"
        if rates is None:
            raise UserError(f"MT5: copy_rates_range({symbol!r}, M15, {window}) failed: {range_error}")
        rates = np.asarray(rates)
        if rates.dtype.names is None or any(f not in rates.dtype.names for f in _RATE_FIELDS):
            raise UserError(f"MT5: copy_rates_range answered an array without the bar fields {_RATE_FIELDS}")
        step = "copy_rates_from_pos"
        n_before = len(rates)
        current = api.copy_rates_from_pos(symbol, TIMEFRAME_M15, 0, 1)
        times = rates["time"].astype("int64")
        keep = times + BAR // pd.Timedelta(seconds=1) <= now_server  # a bar that has not closed yet is forming
        if current is not None and len(current):
            keep &= times < int(np.asarray(current)["time"][0])
        rates = rates[keep]
        warnings = _spec_warnings(info, cfg)
        newer = rates["time"].astype("int64") > (server_epoch(since, cfg) if since is not None else -1)
        if not newer.any():
            _empty_answer(cfg, symbol, window, since, now_utc, range_error)
        frame = mt5_rates_to_frame(rates, cfg, f"MT5 {symbol}")
        if since is None and len(frame) and frame.index[0] - start_utc > pd.Timedelta(days=2):
            warnings.append(
                f"the terminal's history starts at {frame.index[0]:%Y-%m-%d %H:%M} UTC, later than the "
                f"{cfg.data.history_days} days asked for (raise 'Max bars in chart' in the terminal)"
            )
        frame.attrs["source"] = f"mt5 {symbol} M15 ({server or 'default server'} via {where})"
        frame.attrs["demo"] = False
        return FetchResult(frame, info, date_from, date_to, n_before - len(rates), warnings)
    except UserError:
        raise
    except Exception as exc:  # transport or terminal failure; the text may quote the call: redact secrets
        raise UserError(
            redact(f"MT5: {step} via {where} failed: {type(exc).__name__}: {exc}; {_last_error(api)}")
        ) from None
    finally:
        with contextlib.suppress(Exception):
            api.shutdown()


def _empty_answer(
    cfg: Config, symbol: str, window: str, since: pd.Timestamp | None, now_utc: pd.Timestamp, error: str
) -> None:
    """No completed bar came back: an error unless it is an incremental fetch with nothing new to expect yet."""
    if since is None:
        raise UserError(f"MT5: copy_rates_range({symbol!r}, M15, {window}) answered no bars: {error}")
    waited = (now_utc - since) / pd.Timedelta(minutes=1)
    if cfg.data.market_closures == "none" and waited > cfg.data.max_gap_minutes + 15:
        raise UserError(
            f"MT5: copy_rates_range({symbol!r}, M15, {window}) answered no new bars although the last stored bar "
            f"({since:%Y-%m-%d %H:%M} UTC) is {waited:.0f} minutes old on a 24/7 symbol: {error}"
        )
