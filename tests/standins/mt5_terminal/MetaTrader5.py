"""A stand-in MetaTrader 5 terminal module, served to the real ``mt5linux`` client by ``rpyc_classic``.

Run: ``PYTHONPATH=tests/standins/mt5_terminal rpyc_classic --host 127.0.0.1 -p PORT``. The client's
``import MetaTrader5 as mt5`` on the server side then finds this file. It answers like the Windows package does
(``ml/../shared/notes/integrations.md``): booleans / namedtuples / None, ``last_error()`` codes, and ``copy_rates_*``
as numpy structured arrays with the real dtype, whose ``time`` is epoch seconds of the broker's *server wall clock*
(``tz``, default Europe/Athens). At the autumn DST change the server clock repeats an hour and, like a terminal,
the stand-in merges the two UTC hours into the same wall-clock bars (first open, max high, min low, last close).

Bar values are a function of the UTC open time, so a test can check the server-time -> UTC conversion bar by bar:
``open = 30000 + k`` where ``k`` = 15-minute steps since ``start_utc``; ``close = open + 0.5``; ``high = close + 1``;
``low = open - 1``; ``tick_volume = 100 + k % 50``; ``spread = 1500``; ``real_volume = 0``.

The test drives it through a second rpyc connection: ``_standin_configure(...)``, ``_standin_calls()``,
``_standin_server_times()``. Only the calls this project makes are implemented.
"""

from __future__ import annotations

import threading
import time as _time
from collections import namedtuple
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np

TIMEFRAME_M15 = 15
RATES_DTYPE = np.dtype(
    [
        ("time", "<i8"),
        ("open", "<f8"),
        ("high", "<f8"),
        ("low", "<f8"),
        ("close", "<f8"),
        ("tick_volume", "<u8"),
        ("spread", "<i4"),
        ("real_volume", "<u8"),
    ]
)
SymbolInfo = namedtuple(
    "SymbolInfo",
    "name description path visible select digits point spread trade_contract_size volume_min volume_step volume_max "
    "filling_mode",
)
TerminalInfo = namedtuple("TerminalInfo", "connected maxbars build name")
Tick = namedtuple("Tick", "time bid ask last volume")
TradePosition = namedtuple("TradePosition", "ticket time type magic identifier volume price_open sl tp price_current "
                                            "symbol comment")
OrderCheckResult = namedtuple("OrderCheckResult", "retcode balance equity profit margin margin_free margin_level "
                                                  "comment request")
OrderSendResult = namedtuple("OrderSendResult", "retcode deal order volume price bid ask comment request_id "
                                                "retcode_external request")
TRADE_RETCODE_DONE, TRADE_RETCODE_INVALID_FILL, TRADE_RETCODE_INVALID = 10009, 10030, 10013
SYMBOL_FILLING_FOK, SYMBOL_FILLING_IOC = 1, 2

RES_S_OK = (1, "Success")
RES_E_FAIL = (-1, "Terminal: Call failed")
RES_E_NOT_FOUND = (-4, "Terminal: Not found")
RES_E_AUTH_FAILED = (-6, "Terminal: Authorization failed")
RES_E_INTERNAL_FAIL_INIT = (-10003, "IPC initialize failed, MetaTrader 5 x64 not found")
RES_E_NO_IPC = (-10004, "No IPC connection")

_lock = threading.Lock()
_state: dict = {}


def _standin_configure(
    login: int = 1234567,
    password: str = "secret-pass",
    server: str = "Standin-Server",
    symbol: str = "BTCUSD",
    tz: str = "Europe/Athens",
    start_utc: int = 0,
    now_utc: int | None = None,
    lag_s: int = 0,
    rates_mode: str = "ok",
    point: float = 0.01,
) -> None:
    """Reset the terminal. ``now_utc`` None = the real clock minus ``lag_s``. ``rates_mode``: "ok", "empty" (an
    empty array, last_error Success) or "none" (None, last_error Not found)."""
    with _lock:
        _state.clear()
        _state.update(
            login=int(login),
            password=str(password),
            server=str(server),
            symbol=str(symbol),
            tz=str(tz),
            start_utc=int(start_utc),
            now_utc=None if now_utc is None else int(now_utc),
            lag_s=int(lag_s),
            rates_mode=str(rates_mode),
            point=float(point),
            initialized=False,
            error=RES_S_OK,
            calls=[],
            rows=None,
            visible=0,
            positions={},
            next_ticket=1000,
            filling_mode=SYMBOL_FILLING_IOC,
        )


def _standin_set_rows(rows: list, visible: int = 0) -> None:
    """Serve these bars instead of the formula ones: ``(utc_epoch, open, high, low, close, tick_volume, spread)``
    in the given order (duplicates, disorder and broken prices included: the terminal as a bad feed). Only the first
    ``visible`` rows exist yet; :func:`_standin_release` makes more of them arrive."""
    with _lock:
        _state["rows"] = [tuple(r) for r in rows]
        _state["visible"] = int(visible)


def _standin_release(k: int = 1) -> None:
    """``k`` more rows arrive (bars closing over time)."""
    with _lock:
        _state["visible"] = min(len(_state["rows"]), _state["visible"] + int(k))


def _standin_positions() -> tuple:
    with _lock:
        return tuple(tuple(p) for p in _state["positions"].values())


def _standin_close_position(ticket: int) -> None:
    """The broker closed a position (its stop or target was hit)."""
    with _lock:
        _state["positions"].pop(int(ticket), None)


def _rows_array() -> np.ndarray:
    rows = _state["rows"][: _state["visible"]]
    out = [(_wall(int(r[0])), float(r[1]), float(r[2]), float(r[3]), float(r[4]), int(r[5]), int(r[6]), 0)
           for r in rows]
    return np.array(out, dtype=RATES_DTYPE)


_standin_configure()


def _standin_calls() -> tuple:
    """Every call so far as (name, args...) tuples; datetimes as epoch seconds (so they travel by value)."""
    with _lock:
        return tuple(tuple(c) for c in _state["calls"])


def _now() -> int:
    return _state["now_utc"] if _state["now_utc"] is not None else int(_time.time()) - _state["lag_s"]


def _wall(utc_epoch: int) -> int:
    """UTC epoch -> epoch seconds of the server's wall clock."""
    local = datetime.fromtimestamp(utc_epoch, tz=ZoneInfo(_state["tz"]))
    return int(local.replace(tzinfo=UTC).timestamp())


def _bars() -> np.ndarray:
    """All bars up to and including the forming one, keyed by server wall time (merged where the clock repeats)."""
    start = _state["start_utc"]
    forming = _now() // 900 * 900
    utc = np.arange(start, forming + 1, 900, dtype=np.int64)
    k = (utc - start) // 900
    wall = np.array([_wall(int(t)) for t in utc], dtype=np.int64)
    out: list[tuple] = []
    for i in range(utc.size):
        o = 30000.0 + float(k[i])
        c = o + 0.5
        row = [int(wall[i]), o, c + 1.0, o - 1.0, c, 100 + int(k[i]) % 50, 1500, 0]
        if out and out[-1][0] == row[0]:  # repeated wall-clock bar: merge like a terminal does
            prev = out[-1]
            out[-1] = (prev[0], prev[1], max(prev[2], row[2]), min(prev[3], row[3]), row[4], prev[5] + row[5], 1500, 0)
        elif out and row[0] < out[-1][0]:  # the repeated hour continues into an already written wall time
            j = next(n for n in range(len(out) - 1, -1, -1) if out[n][0] == row[0])
            prev = out[j]
            out[j] = (prev[0], prev[1], max(prev[2], row[2]), min(prev[3], row[3]), row[4], prev[5] + row[5], 1500, 0)
        else:
            out.append(tuple(row))
    return np.array(out, dtype=RATES_DTYPE)


def _standin_server_times() -> tuple:
    """The server-time epochs of all bars the terminal holds (for the test's own cross-checks)."""
    with _lock:
        return tuple(int(t) for t in _bars()["time"])


def _record(name: str, *args) -> None:
    _state["calls"].append((name, *args))


def _ready() -> bool:
    if not _state["initialized"]:
        _state["error"] = RES_E_NO_IPC
        return False
    return True


# ------------------------------------------------------------------------------------------- the module API
def initialize(path=None, *, login=None, password=None, server=None, timeout=60000, portable=False):
    with _lock:
        _record("initialize", login, server)
        if login is not None and (
            login != _state["login"] or password != _state["password"] or server != _state["server"]
        ):
            _state["error"] = RES_E_AUTH_FAILED
            return False
        _state["initialized"] = True
        _state["error"] = RES_S_OK
        return True


def shutdown():
    with _lock:
        _record("shutdown")
        _state["initialized"] = False
        return True


def last_error():
    with _lock:
        return tuple(_state["error"])


def version():
    with _lock:
        return (500, 5000, "01 Jan 2026") if _ready() else None


def terminal_info():
    with _lock:
        return TerminalInfo(True, 100000, 5000, "Stand-in MetaTrader 5") if _ready() else None


def symbol_select(symbol, enable=True):
    with _lock:
        _record("symbol_select", symbol, enable)
        if not _ready():
            return False
        if symbol != _state["symbol"]:
            _state["error"] = RES_E_FAIL
            return False
        _state["error"] = RES_S_OK
        return True


def symbol_info(symbol):
    with _lock:
        _record("symbol_info", symbol)
        if not _ready():
            return None
        if symbol != _state["symbol"]:
            _state["error"] = RES_E_FAIL
            return None
        return SymbolInfo(
            symbol,
            "Bitcoin vs US Dollar",
            f"Crypto\\{symbol}",
            True,
            True,
            2,
            _state["point"],
            1500,
            1.0,
            0.01,
            0.01,
            100.0,
            _state["filling_mode"],
        )


def copy_rates_range(symbol, timeframe, date_from, date_to):
    with _lock:
        t0, t1 = int(date_from.timestamp()), int(date_to.timestamp())
        _record("copy_rates_range", symbol, timeframe, t0, t1)
        if not _ready():
            return None
        if symbol != _state["symbol"] or timeframe != TIMEFRAME_M15:
            _state["error"] = RES_E_FAIL
            return None
        if _state["rates_mode"] == "none":
            _state["error"] = RES_E_NOT_FOUND
            return None
        if _state["rates_mode"] == "empty":
            _state["error"] = RES_S_OK
            return np.zeros(0, dtype=RATES_DTYPE)
        bars = _bars() if _state["rows"] is None else _rows_array()
        _state["error"] = RES_S_OK
        return bars[(bars["time"] >= t0) & (bars["time"] <= t1)].copy()


def copy_rates_from_pos(symbol, timeframe, start_pos, count):
    with _lock:
        _record("copy_rates_from_pos", symbol, timeframe, start_pos, count)
        if not _ready():
            return None
        if symbol != _state["symbol"] or _state["rates_mode"] != "ok":
            _state["error"] = RES_E_NOT_FOUND
            return None
        if _state["rows"] is not None:  # explicit rows are all closed; the forming bar follows the last one
            rows = _rows_array()
            last = int(rows["time"].max()) if rows.size else 0
            forming = np.array([(last + 900, 1.0, 1.0, 1.0, 1.0, 0, 0, 0)], dtype=RATES_DTYPE)
            bars = np.concatenate([rows, forming]) if rows.size else forming
        else:
            bars = _bars()
        end = bars.size - int(start_pos)
        _state["error"] = RES_S_OK
        return bars[max(0, end - int(count)) : end].copy()


# ------------------------------------------------------------------------------------------------- trading
def _last_close() -> float:
    if _state["rows"] is not None:
        rows = _state["rows"][: _state["visible"]]
        return float(rows[-1][4]) if rows else 30000.0
    bars = _bars()
    return float(bars["close"][-2]) if bars.size > 1 else 30000.0


def symbol_info_tick(symbol):
    with _lock:
        _record("symbol_info_tick", symbol)
        if not _ready() or symbol != _state["symbol"]:
            return None
        bid = _last_close()
        return Tick(_now(), bid, bid + 15.0, bid, 1)


def _check(request) -> int:
    need = ("action", "symbol", "volume", "type", "price", "magic", "type_filling")
    if any(k not in request for k in need) or request["symbol"] != _state["symbol"]:
        return TRADE_RETCODE_INVALID
    for v in request.values():  # what mt5linux can carry: plain values only
        if type(v) not in (int, float, str):
            return TRADE_RETCODE_INVALID
    allowed = {0: SYMBOL_FILLING_FOK, 1: SYMBOL_FILLING_IOC}.get(request["type_filling"], 0)
    if not allowed & _state["filling_mode"]:
        return TRADE_RETCODE_INVALID_FILL
    return 0


def order_check(request):
    with _lock:
        request = dict(request)
        _record("order_check", request.get("type"), request.get("volume"))
        if not _ready():
            return None
        code = _check(request)
        return OrderCheckResult(code, 10000.0, 10000.0, 0.0, 100.0, 9900.0, 10000.0,
                                "Done" if code == 0 else "Invalid request", None)


def order_send(request):
    with _lock:
        request = dict(request)
        _record("order_send", request.get("type"), request.get("volume"), request.get("sl"), request.get("tp"),
                request.get("magic"), request.get("position"))
        if not _ready():
            return None
        code = _check(request)
        if code:
            return OrderSendResult(code, 0, 0, 0.0, 0.0, 0.0, 0.0, "Invalid request", 1, 0, None)
        price = float(request["price"])
        if "position" in request:
            _state["positions"].pop(int(request["position"]), None)
        else:
            ticket = _state["next_ticket"]
            _state["next_ticket"] += 1
            _state["positions"][ticket] = TradePosition(
                ticket, _now(), int(request["type"]), int(request["magic"]), ticket, float(request["volume"]), price,
                float(request.get("sl", 0.0)), float(request.get("tp", 0.0)), price, request["symbol"],
                str(request.get("comment", "")))
        _state["next_ticket"] += 1
        return OrderSendResult(TRADE_RETCODE_DONE, _state["next_ticket"], _state["next_ticket"],
                               float(request["volume"]), price, price, price, "Request executed", 1, 0, None)


def positions_get(symbol=None, ticket=None):
    with _lock:
        _record("positions_get", symbol)
        if not _ready():
            return None
        return tuple(p for p in _state["positions"].values() if symbol in (None, p.symbol))


def _standin_set_mode(rates_mode: str) -> None:
    """"ok", or "none" (copy_rates_* answer None: the terminal lost its connection), keeping bars and positions."""
    with _lock:
        _state["rates_mode"] = str(rates_mode)
