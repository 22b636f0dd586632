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
    "name description path visible select digits point spread trade_contract_size volume_min volume_step volume_max",
)
TerminalInfo = namedtuple("TerminalInfo", "connected maxbars build name")

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
        )


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
        bars = _bars()
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
        bars = _bars()
        end = bars.size - int(start_pos)
        _state["error"] = RES_S_OK
        return bars[max(0, end - int(count)) : end].copy()
