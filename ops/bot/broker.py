"""MetaTrader 5 orders for ``--live``: market entries with stop and target, market exits, our open positions.

Why this shape: the Trader decides (entries, sizes, model/time exits); the broker executes. An entry is a
``TRADE_ACTION_DEAL`` market order carrying the stop and target (so they live at the broker even if the bot dies),
checked with ``order_check`` first; a model/time exit is the opposite deal with ``"position": ticket``. Positions
opened by this bot carry :attr:`MT5Broker.magic`; anything else on the account is never touched. Every request holds
plain ``int``/``float``/``str`` values: mt5linux evaluates the request's text on the Windows side, where a numpy
scalar would not parse (shared notes). Each session logs in with :func:`market.data.mt5.login_args` and always shuts
the terminal connection down again, like the data fetch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from core.config import Config, redact
from core.errors import UserError
from ops.bot.feed import FeedError

# MQL5 constants (the MetaTrader5 module's values; mt5linux copies them)
TRADE_ACTION_DEAL = 1
ORDER_TYPE_BUY, ORDER_TYPE_SELL = 0, 1
ORDER_TIME_GTC = 0
ORDER_FILLING_FOK, ORDER_FILLING_IOC, ORDER_FILLING_RETURN = 0, 1, 2
SYMBOL_FILLING_FOK, SYMBOL_FILLING_IOC = 1, 2
TRADE_RETCODE_DONE = 10009
DEFAULT_MAGIC = 15_015_001


def filling_type(filling_mode: int) -> int:
    """``symbol_info().filling_mode`` is a bitmask of allowed modes, not an ORDER_FILLING_* value (10030 if wrong)."""
    if filling_mode & SYMBOL_FILLING_FOK:
        return ORDER_FILLING_FOK
    if filling_mode & SYMBOL_FILLING_IOC:
        return ORDER_FILLING_IOC
    return ORDER_FILLING_RETURN


def _last_error(api: Any) -> str:
    with contextlib.suppress(Exception):
        return repr(tuple(api.last_error()))
    return "(last_error unavailable)"


class MT5Broker:
    """Orders and positions of one account, identified by ``magic``."""

    def __init__(self, cfg: Config, magic: int = DEFAULT_MAGIC, deviation_points: int = 50) -> None:
        self.cfg = cfg
        self.magic = int(magic)
        self.deviation = int(deviation_points)

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        """A logged-in terminal connection (FeedError when the terminal cannot be reached: retry later)."""
        from market.data.mt5 import connect, login_args

        args, kwargs = login_args()
        try:
            api, where = connect(self.cfg)
        except UserError as exc:
            raise FeedError(str(exc)) from None
        try:
            if not api.initialize(*args, **kwargs):
                raise FeedError(f"MT5: initialize via {where} failed: {_last_error(api)}")
            if not api.symbol_select(self.cfg.symbol, True):
                raise FeedError(f"MT5: symbol_select({self.cfg.symbol!r}) failed: {_last_error(api)}")
            yield api
        except (OSError, EOFError) as exc:
            raise FeedError(redact(f"MT5: connection lost ({type(exc).__name__}: {exc})")) from None
        finally:
            with contextlib.suppress(Exception):
                api.shutdown()

    def positions(self, api: Any) -> list[dict[str, Any]]:
        """This bot's open positions (magic number) on the configured symbol, as plain dicts."""
        got = api.positions_get(symbol=self.cfg.symbol)
        if got is None:
            raise FeedError(f"MT5: positions_get failed: {_last_error(api)}")
        out = []
        for p in got:
            if int(p.magic) != self.magic:
                continue
            out.append({"ticket": int(p.ticket), "side": 1 if int(p.type) == ORDER_TYPE_BUY else -1,
                        "volume": float(p.volume), "price_open": float(p.price_open), "sl": float(p.sl),
                        "tp": float(p.tp), "comment": str(p.comment)})
        return out

    def _volume(self, size: float) -> float:
        step = self.cfg.symbol_spec.volume_step
        digits = max(0, len(f"{step:.10f}".rstrip("0").split(".")[1]))
        return float(round(round(size / step) * step, digits))

    def _send(self, api: Any, req: dict[str, Any]) -> dict[str, Any]:
        check = api.order_check(req)
        if check is None:
            return {"ok": False, "error": f"order_check failed: {_last_error(api)}"}
        if int(check.retcode) != 0:
            return {"ok": False, "error": f"order_check refused: retcode {int(check.retcode)} {check.comment}"}
        res = api.order_send(req)
        if res is None:
            return {"ok": False, "error": f"order_send failed: {_last_error(api)}"}
        if int(res.retcode) != TRADE_RETCODE_DONE:
            return {"ok": False, "error": f"order_send refused: retcode {int(res.retcode)} {res.comment}"}
        return {"ok": True, "deal": int(res.deal), "order": int(res.order), "price": float(res.price),
                "volume": float(res.volume)}

    def _base(self, api: Any, side: int, volume: float, comment: str) -> dict[str, Any]:
        info = api.symbol_info(self.cfg.symbol)
        tick = api.symbol_info_tick(self.cfg.symbol)
        if info is None or tick is None:
            raise FeedError(f"MT5: symbol_info/symbol_info_tick failed: {_last_error(api)}")
        price = float(tick.ask) if side > 0 else float(tick.bid)
        return {"action": TRADE_ACTION_DEAL, "symbol": str(self.cfg.symbol), "volume": float(volume),
                "type": ORDER_TYPE_BUY if side > 0 else ORDER_TYPE_SELL, "price": price,
                "deviation": self.deviation, "magic": self.magic, "comment": str(comment)[:31],
                "type_time": ORDER_TIME_GTC, "type_filling": filling_type(int(getattr(info, "filling_mode", 0))),
                "_digits": int(info.digits)}

    def open(self, api: Any, side: int, size: float, sl_dist: float, tp_dist: float, comment: str) -> dict[str, Any]:
        """Market entry with stop and target at the distances the Trader decided (anchored on the request price)."""
        req = self._base(api, side, self._volume(size), comment)
        digits = req.pop("_digits")
        req["sl"] = float(round(req["price"] - side * sl_dist, digits))
        req["tp"] = float(round(req["price"] + side * tp_dist, digits))
        out = self._send(api, req)
        out.update(side=side, requested_price=req["price"], sl=req["sl"], tp=req["tp"], volume_req=req["volume"])
        return out

    def close(self, api: Any, position: dict[str, Any], comment: str) -> dict[str, Any]:
        """Close one of our positions at market (the opposite deal on its ticket)."""
        req = self._base(api, -position["side"], position["volume"], comment)
        req.pop("_digits")
        req["position"] = int(position["ticket"])
        out = self._send(api, req)
        out.update(ticket=position["ticket"], requested_price=req["price"])
        return out
