"""The bot's loop: at each M15 close, the closed bar -> last feature row -> ``Trader`` -> journal -> saved state.

Files (``<root>/live/<name>/``, ``--state-dir`` to choose): ``state.json`` (the Trader's State, the last bar used,
the deployed set in use; replaced atomically after every bar), ``journal/YYYY-MM-DD.jsonl`` (one JSON line per bar,
rotated per UTC day, older days than ``--keep-days`` deleted), ``days/YYYY-MM-DD.json`` (the start state of each
day and the bars before it: what ``--parity DAY`` replays from), ``events.jsonl`` (starts, reconciliations,
refused sets), ``parity.jsonl`` (one line per parity check: the weekly report reads it), ``notifications.md``.

Restart after a kill at any instant: the journal line of a bar is written before the state that says the bar is
done, so on start every journal line after the saved bar (and a torn last line) is cut, and the bar is processed
again from the same state: same decisions, same journal bytes (``tests/test_live.py`` kills at several points).
In ``--live`` an order sent for a bar whose state was not saved is not sent twice: the start reconciles with the
terminal's positions carrying the bot's magic number, and an entry is only sent when we hold none.

Weekly swap: before each bar the fingerprint of ``models/manifest.json`` + ``config.json`` is compared with the set
in use. A new one is loaded with both files read together (a deploy journal present, or a hash that changed while
loading, means the switch is half-way: try again at the next bar), verified (every model file's hash; a failure is
refused with an alert and the old set keeps trading), and switched in before the bar is processed: the State, and so
an open position with its stop and target, carries over; its exits use the new exit model from then on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from backtest.live import HISTORY_BARS, BarReport, Trader
from backtest.policy import GATE_REASONS, VOL_REGIME_BARS, State
from core.config import Config, load_config
from core.errors import UserError
from core.io import atomic_write_json, sha256_file
from core.paths import Paths
from market.features import feature_names, last_row_arrays
from ops.bot.feed import Bar, FeedError, check_bar

log = logging.getLogger("live")

STATE_VERSION = 1
CRASH_ENV = "LIVE_CRASH_AT"  # test hook: "<point>@<bar>" SIGKILLs the process there (see _crash_point)
CRASH_POINTS = ("before_journal", "torn_journal", "after_journal", "after_state")
ALERT_REPEAT_S = 3600.0
PRICE_RTOL = 1e-9


def _crash_point(name: str, bar: int) -> None:
    """Test hook on a real process (like ``ops.deploy``'s): SIGKILL ourselves at ``name`` of bar ``bar``."""
    want = os.environ.get(CRASH_ENV)
    if want and want == f"{name}@{bar}":
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------- the deployed set
class SetRefused(UserError):
    """The deployed set cannot be used (missing, modified, half-switched): the bot keeps the one it has."""


@dataclass
class Deployed:
    """A loaded, verified deployed set: config + predictor, and the hashes it was loaded from."""

    cfg: Config
    predictor: Any
    manifest_sha: str
    config_sha: str

    @property
    def id(self) -> str:
        return f"{self.manifest_sha[:12]}/{self.config_sha[:12]}"


def fingerprint(paths: Paths) -> tuple[str, str]:
    """(manifest sha256, config sha256) of the deployed set as it is on disk now ("" for a missing file)."""
    man = paths.models / "manifest.json"
    return (sha256_file(man) if man.exists() else "", sha256_file(paths.config) if paths.config.exists() else "")


def load_deployed(paths: Paths, rule_signal: bool = False, wait_s: float = 1.0) -> Deployed:
    """Load ``models/`` + ``config.json`` as one unit with :func:`ml.models.bundle.load_deployed` (signature and
    every file's hash checked before anything is decoded; both read together, retried once when a switch is
    half-way). ``rule_signal``: the config only, with the rule-based signal. Raises :class:`SetRefused`."""
    if rule_signal:
        from backtest.rules import RuleSignal

        if paths.journal.exists():
            raise SetRefused("a model/config switch is in progress (deploy journal present)")
        _, config_sha = fingerprint(paths)
        if not config_sha:
            raise SetRefused(f"{paths.config}: missing")
        try:
            cfg = load_config(paths.config)
        except UserError as exc:
            raise SetRefused(str(exc)) from None
        if fingerprint(paths)[1] != config_sha:
            raise SetRefused("config.json changed while being read")
        return Deployed(cfg, RuleSignal(feature_names(cfg)), fingerprint(paths)[0], config_sha)
    from ml.models.bundle import load_deployed as load_pair

    try:
        d = load_pair(paths, retry_wait_s=wait_s)
    except UserError as exc:
        raise SetRefused(str(exc)) from None
    return Deployed(d.config, d.bundle, d.manifest_sha256, d.config_sha256)


_HALF_WAY = ("in progress", "changed while being read", "no consistent pair")


# ------------------------------------------------------------------------------------------------------ window
class Window:
    """The last :data:`HISTORY_BARS` bars as arrays (what :func:`market.features.last_row_arrays` reads)."""

    def __init__(self, n: int = HISTORY_BARS) -> None:
        self.n = n
        self.t = np.zeros(0, dtype=np.int64)
        self.v = np.zeros((6, 0))

    def extend(self, bars: list[Bar]) -> None:
        if not bars:
            return
        t = np.array([b.time_ns for b in bars], dtype=np.int64)
        v = np.array([b.values() for b in bars], dtype=np.float64).T
        self.t = np.concatenate([self.t, t])[-self.n:]
        self.v = np.concatenate([self.v, v], axis=1)[:, -self.n:]

    def to_json(self) -> dict[str, list[Any]]:
        return {"t": self.t.tolist(), **{k: self.v[i].tolist() for i, k in enumerate("ohlcvs")}}

    def features(self, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
        v = self.v
        return last_row_arrays(self.t, v[0], v[1], v[2], v[3], v[4], v[5], cfg, atr_tail=VOL_REGIME_BARS)


def window_frame(w: dict[str, list[Any]]) -> pd.DataFrame:
    idx = pd.DatetimeIndex(np.asarray(w["t"], dtype=np.int64), tz="UTC", name="time")
    cols = {"open": "o", "high": "h", "low": "l", "close": "c", "tick_volume": "v", "spread": "s"}
    df = pd.DataFrame({k: np.asarray(w[s], dtype=np.float64) for k, s in cols.items()}, index=idx)
    df["real_volume"] = 0.0
    return df


# ----------------------------------------------------------------------------------------------------- journal
class Journal:
    """One JSON line per bar in ``journal/YYYY-MM-DD.jsonl`` (UTC day of the bar): append-only, rotated per day."""

    def __init__(self, folder: Path, fsync: bool) -> None:
        self.dir = folder / "journal"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync

    def path(self, day: str) -> Path:
        return self.dir / f"{day}.jsonl"

    def days(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.jsonl"))

    def append(self, day: str, lines: list[dict[str, Any]], bar: int = -1) -> None:
        data = "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines).encode()
        with open(self.path(day), "ab") as fh:
            if os.environ.get(CRASH_ENV) == f"torn_journal@{bar}":
                fh.write(data[: len(data) // 2])
                fh.flush()
                _crash_point("torn_journal", bar)
            fh.write(data)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())

    def read(self, day: str) -> list[dict[str, Any]]:
        p = self.path(day)
        if not p.exists():
            return []
        return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]

    def cut_after(self, bar: int) -> int:
        """Drop every line of a bar after ``bar`` and a torn last line (a kill between journal and state)."""
        cut = 0
        for day in reversed(self.days()):
            p = self.path(day)
            raw = p.read_bytes()
            keep: list[bytes] = []
            all_kept = True
            for ln in raw.split(b"\n"):
                if not ln:
                    continue
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:
                    all_kept = False
                    cut += 1
                    continue
                if int(rec.get("bar", -1)) > bar:
                    all_kept = False
                    cut += 1
                    continue
                keep.append(ln + b"\n")
            if not all_kept:
                if keep:
                    from core.io import atomic_write_bytes

                    atomic_write_bytes(p, b"".join(keep))
                else:
                    p.unlink()
            else:
                break
        return cut

    def rotate(self, keep_days: int, today: str) -> list[str]:
        """Delete day files older than ``keep_days`` before ``today`` (and their day snapshots)."""
        limit = (pd.Timestamp(today) - pd.Timedelta(days=keep_days)).strftime("%Y-%m-%d")
        gone = [d for d in self.days() if d < limit]
        for d in gone:
            self.path(d).unlink(missing_ok=True)
            (self.dir.parent / "days" / f"{d}.json").unlink(missing_ok=True)
        return gone


def _num(x: Any) -> float | None:
    """A float for the journal, None for NaN (the journal is strict JSON)."""
    x = float(x)
    return x if np.isfinite(x) else None


def _trade_json(rec: Any) -> dict[str, Any]:
    d = asdict(rec)
    d["entry_time"] = pd.Timestamp(d.pop("entry_time_ns"), tz="UTC").isoformat()
    d["exit_time"] = pd.Timestamp(d.pop("exit_time_ns"), tz="UTC").isoformat()
    return d


# ---------------------------------------------------------------------------------------------------------- bot
@dataclass
class BotOptions:
    """How the bot runs (the CLI fills it)."""

    mode: str = "shadow"  # "shadow" | "live"
    state_dir: Path | None = None
    keep_days: int = 400
    poll_seconds: float = 5.0
    rule_signal: bool = False
    fsync: bool = True
    daily_parity: bool = True
    max_bars: int | None = None  # stop after this many processed bars (tests, dry runs)
    extra: dict[str, Any] = field(default_factory=dict)


class Bot:
    """The trading loop around one :class:`backtest.live.Trader` (module docstring)."""

    def __init__(self, paths: Paths, feed: Any, opts: BotOptions, broker: Any = None, notifier: Any = None) -> None:
        self.paths = paths
        self.feed = feed
        self.opts = opts
        self.broker = broker
        self.dir = Path(opts.state_dir) if opts.state_dir else paths.root / "live" / opts.mode
        self.dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.dir, opts.fsync)
        self.state_path = self.dir / "state.json"
        self._notifier = notifier
        self._alerted: dict[str, float] = {}
        self._refused: tuple[str, str] | None = None
        self.deployed: Deployed | None = None
        self.trader: Trader | None = None
        self.window = Window()
        self.bar_no = -1
        self.last: Bar | None = None
        self.start_state: dict[str, Any] | None = None
        self.processed = 0

    # ---------------------------------------------------------------------------------------------- messages
    def event(self, kind: str, **info: Any) -> None:
        """A line in ``events.jsonl`` (starts, reconciliations, refused sets; the journal keeps only bars)."""
        rec = {"event": kind, "at": pd.Timestamp.now(tz="UTC").isoformat(), **info}
        with open(self.dir / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, sort_keys=True, default=str) + "\n")

    def alert(self, key: str, text: str) -> None:
        """Log line + notification (file, Telegram when configured); the same key at most once an hour."""
        log.warning(text)
        now = time.monotonic()
        if now - self._alerted.get(key, -1e18) < ALERT_REPEAT_S:
            return
        self._alerted[key] = now
        if self._notifier is None and self.deployed is not None:
            from ops.notify import make_notifier

            self._notifier = make_notifier(self.deployed.cfg, self.paths, self.dir)
        if self._notifier is not None:
            self._notifier.send(f"live bot ({self.opts.mode}): {text}")

    # -------------------------------------------------------------------------------------------------- start
    def start(self) -> None:
        """Load the deployed set, restore (or create) the state, cut the journal back to it, reconcile (live)."""
        self.deployed = load_deployed(self.paths, self.opts.rule_signal)
        cfg = self.deployed.cfg
        saved = json.loads(self.state_path.read_text(encoding="utf-8")) if self.state_path.exists() else None
        if saved is not None:
            if saved.get("version") != STATE_VERSION:
                raise UserError(f"{self.state_path}: unknown state version {saved.get('version')!r}")
            try:
                state = State.from_dict(saved["trader"])
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{self.state_path}: field trader: {exc}") from None
            self.bar_no = int(saved["bar"])
            self.last = Bar(**saved["last"]) if saved.get("last") else None
            self.start_state = saved.get("start_state")
            if saved.get("set") != self.deployed.id:
                self.event("set_changed_while_stopped", was=saved.get("set"), now=self.deployed.id)
            log.info("resuming at bar %d (%s), %s", self.bar_no, self.last.time if self.last else "-",
                     "in a position" if state.side else "flat")
            self.event("resume", bar=self.bar_no, side=state.side)
        else:
            state = None
            self.event("start", set=self.deployed.id, mode=self.opts.mode)
        self.trader = Trader(cfg, self.deployed.predictor, state=state)
        if self.start_state is None:
            self.start_state = self.trader.state.to_dict()
        until = self.last.time_ns if self.last else None
        self.window.extend(self.feed.history(HISTORY_BARS, until))
        if self.last is None and len(self.window.t):  # a fresh start: the history's last bar is the last one used
            self.last = Bar(int(self.window.t[-1]), *(float(x) for x in self.window.v[:, -1]))
            self.bar_no = self._number(self.last) if hasattr(self.feed, "position") else len(self.window.t) - 1
        cut = self.journal.cut_after(self.bar_no)  # lines of bars the saved state does not include (a kill)
        if cut:
            log.info("%d unfinished journal line(s) after bar %d cut", cut, self.bar_no)
        if self.opts.mode == "live":
            self.reconcile()

    def _number(self, bar: Bar) -> int:
        """The bar number: the file position for a recorded feed (= the backtest's), else a running counter."""
        if hasattr(self.feed, "position"):
            return int(self.feed.position(bar.time_ns))
        return self.bar_no + 1

    def reconcile(self) -> None:
        """Compare the state with the terminal's positions carrying our magic number and say what was found."""
        s = self.trader.state
        with self.broker.session() as api:
            pos = self.broker.positions(api)
        where = f"in a {'long' if s.side > 0 else 'short'} position" if s.side else "flat"
        msg = (f"reconcile: the state is {where}{' with an entry pending' if s.pending_side else ''}; "
               f"the terminal holds {len(pos)} position(s) "
               f"with magic {self.broker.magic}: " + (", ".join(
                   f"#{p['ticket']} {'buy' if p['side'] > 0 else 'sell'} {p['volume']} @ {p['price_open']} "
                   f"sl {p['sl']} tp {p['tp']}" for p in pos) or "none"))
        print(msg, flush=True)
        self.event("reconcile", positions=pos, state_side=s.side)
        if bool(pos) != bool(s.side or s.pending_side):
            self.alert("reconcile", msg + " (mismatch: the terminal's stop/target manage it; check by hand)")

    # ------------------------------------------------------------------------------------------------ swap
    def check_swap(self, bar: int, day: str) -> None:
        fp = fingerprint(self.paths)
        cur = (self.deployed.manifest_sha, self.deployed.config_sha)
        if fp == cur or fp == self._refused:
            return
        try:
            new = load_deployed(self.paths, self.opts.rule_signal, wait_s=0.2)
        except SetRefused as exc:
            if self.paths.journal.exists() or any(k in str(exc) for k in _HALF_WAY):
                return  # the switch is in progress: look again at the next bar
            self._refused = fp
            self.alert("set_refused", f"new deployed set refused, the old one ({self.deployed.id}) keeps trading: "
                                      f"{exc}")
            self.event("set_refused", reason=str(exc))
            self.journal.append(day, [{"type": "event", "event": "set_refused", "bar": bar, "reason": str(exc),
                                       "kept": self.deployed.id}], bar)
            return
        old, s = self.deployed, self.trader.state
        self.deployed = new
        self.trader = Trader(new.cfg, new.predictor, state=s)
        pos = ("flat" if not s.side else f"{'long' if s.side > 0 else 'short'} {s.size} @ {s.entry_price} kept: "
               f"stop {s.stop}, target {s.target} unchanged; its exits use the new exit model from now on")
        self.journal.append(day, [{"type": "event", "event": "swap", "bar": bar, "from": old.id, "to": new.id,
                                   "position": pos}], bar)
        self.event("swap", was=old.id, now=new.id, position=pos)
        log.info("weekly swap at bar %d: %s -> %s (%s)", bar, old.id, new.id, pos)

    # ------------------------------------------------------------------------------------------------- a bar
    def process(self, bar: Bar, is_last: bool = False, block_entry: bool = False, problem: str = "",
                send_orders: bool = True) -> dict[str, Any]:
        """Process one checked, closed bar: swap check, features, Trader, (orders), journal, state."""
        n = self._number(bar)
        day = bar.time.strftime("%Y-%m-%d")
        new_day = self.last is None or self.last.time.strftime("%Y-%m-%d") != day
        snap = self.dir / "days" / f"{day}.json"
        if new_day or not snap.exists():  # the day's start state (or, started mid-day, this bar's) and the bars
            self._write_json(snap,  # before it: what --parity DAY replays from
                             {"bar": n, "state": self.trader.state.to_dict(), "window": self.window.to_json(),
                              "set": self.deployed.id})
        self.check_swap(n, day)
        self.window.extend([bar])
        row, atr = self.window.features(self.deployed.cfg)
        pred = self.trader.predict_row(row)
        if block_entry:
            pred = {**pred, "p_long": float("nan"), "p_short": float("nan")}
        rep: BarReport = self.trader.step_row(n, bar.time_ns, bar.open, bar.high, bar.low, bar.close, bar.spread,
                                              row, atr, is_last=is_last, pred=pred)
        s = self.trader.state
        line: dict[str, Any] = {
            "type": "bar", "bar": n, "time": bar.time.isoformat(), "bar_values": bar.to_json(),
            "inputs": hashlib.sha256(row.tobytes() + np.asarray(bar.values()).tobytes()).hexdigest()[:16],
            "p_long": _num(pred["p_long"]), "p_short": _num(pred["p_short"]), "sl_atr": _num(pred["sl_atr"]),
            "tp_atr": _num(pred["tp_atr"]),
            "decision": ("long" if rep.order_side > 0 else "short" if rep.order_side < 0 else
                         "exit_" + ("model" if rep.pending_exit == 3 else "time") if rep.pending_exit else
                         "hold" if s.side else "none"),
            "gate": "feed_gap" if block_entry else (GATE_REASONS[rep.gate] if rep.gate >= 0 else None),
            "order": ({"side": rep.order_side, "size": rep.order_size, "sl_dist": s.pending_sl_dist,
                       "tp_dist": s.pending_tp_dist, "risk_mult": s.pending_risk_mult} if rep.order_side else None),
            "fills": [], "closed": _trade_json(rep.closed) if rep.closed is not None else None,
            "trips": rep.trips, "equity": rep.equity, "realised": s.equity, "set": self.deployed.id,
            "last": bool(is_last),
        }
        if problem:
            line["feed"] = problem
        if rep.filled:
            line["fills"].append({"kind": "entry", "sim_price": s.entry_price if s.side else rep.closed.entry_price
                                  if rep.closed else None})
        if rep.closed is not None:
            line["fills"].append({"kind": "exit", "sim_price": rep.closed.exit_price, "reason": rep.closed.exit_reason})
        if self.opts.mode == "live" and self.feed.live:
            self._execute(line, rep, send_orders)
        if self.feed.live:
            line["at"] = pd.Timestamp.now(tz="UTC").isoformat()  # wall clock: only where bars arrive in real time
        _crash_point("before_journal", n)
        self.journal.append(day, [line], n)
        _crash_point("after_journal", n)
        self.bar_no, self.last = n, bar
        self.save()
        _crash_point("after_state", n)
        self.processed += 1
        if new_day:
            self.journal.rotate(self.opts.keep_days, day)
            if self.feed.live and self.opts.daily_parity and self.journal.days()[:-1]:
                self.daily_parity(self.journal.days()[-2])
        return line

    def _write_json(self, path: Path, obj: Any) -> None:
        """Atomic always (temp + rename: a kill leaves the old or the new file); durable (fsync, core.io) unless the
        feed is a recorded file, where a power cut only means replaying the file again and fsync would dominate."""
        if self.opts.fsync:
            atomic_write_json(path, obj, indent=None)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(obj) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def save(self) -> None:
        self._write_json(self.state_path, {
            "version": STATE_VERSION, "mode": self.opts.mode, "bar": self.bar_no,
            "last": asdict(self.last) if self.last else None, "trader": self.trader.state.to_dict(),
            "set": self.deployed.id, "start_state": self.start_state,
        })

    def _execute(self, line: dict[str, Any], rep: BarReport, send_orders: bool) -> None:
        """--live: mirror the decision at the broker (entry with stop/target, or a market exit)."""
        s = self.trader.state
        want_exit = bool(rep.pending_exit)
        want_entry = rep.order_side != 0
        if not (want_exit or want_entry or rep.closed is not None):
            return
        if not send_orders:
            line["broker"] = "stale bar (catching up): no order sent"
            return
        try:
            with self.broker.session() as api:
                pos = self.broker.positions(api)
                if want_exit or (rep.closed is not None and s.side == 0 and not want_entry):
                    for p in pos:
                        res = self.broker.close(api, p, f"wo exit b{line['bar']}")
                        line["fills"].append({"kind": "broker_exit", **res})
                    pos = []
                if want_entry:
                    if pos:
                        line["broker"] = f"entry not sent: already holding #{pos[0]['ticket']} (sent before a restart)"
                    else:
                        res = self.broker.open(api, rep.order_side, rep.order_size, s.pending_sl_dist,
                                               s.pending_tp_dist, f"wo b{line['bar']}")
                        line["fills"].append({"kind": "broker_entry", **res})
                        if not res.get("ok"):
                            self.alert("order", f"entry order failed at bar {line['time']}: {res.get('error')}")
        except FeedError as exc:
            line["broker"] = f"error: {exc}"
            self.alert("broker", f"order path failed at bar {line['time']}: {exc}")

    # ---------------------------------------------------------------------------------------------- the loop
    def run(self) -> int:
        """Poll the feed, check and process every new closed bar, until the recorded feed ends (or max_bars)."""
        backoff = self.opts.poll_seconds
        while True:
            if self.opts.max_bars is not None and self.processed >= self.opts.max_bars:
                return self.processed
            if self.feed.done(self.last.time_ns if self.last else None):
                return self.processed
            try:
                bars = self.feed.poll(self.last.time_ns if self.last else None)
                backoff = self.opts.poll_seconds
            except FeedError as exc:
                self.alert("feed", f"feed unavailable, retrying in {backoff:.0f} s: {exc}")
                time.sleep(backoff)
                backoff = min(backoff * 2, 300.0)
                continue
            fresh = [b for b in bars if self.last is None or b != self.last]  # fetch repeats the last bar
            for k, b in enumerate(fresh):
                v = check_bar(b, self.last, self.deployed.cfg)
                if v.message:
                    self.alert(v.problem, v.message)
                if not v.use:
                    continue
                try:
                    self.process(b, is_last=self.feed.is_last(b), block_entry=v.block_entry, problem=v.problem,
                                 send_orders=k == len(fresh) - 1)
                except FeedError as exc:
                    self.alert("feed", f"bar {b.time} not processed: {exc}")
                    break
                if self.opts.max_bars is not None and self.processed >= self.opts.max_bars:
                    return self.processed
            if self.feed.live and not fresh:
                time.sleep(self.opts.poll_seconds)

    # ------------------------------------------------------------------------------------------------ parity
    def daily_parity(self, day: str) -> ParityResult | None:
        """The check after each UTC day; it never stops the bot (a failure is an alert)."""
        try:
            res = parity_day(self.dir, day, self.paths, self.deployed, self.opts.mode)
        except Exception as exc:  # noqa: BLE001 - a check must not take the trading loop down
            self.alert("parity_failed", f"parity check for {day} could not run: {type(exc).__name__}: {exc}")
            return None
        self.report_parity(res)
        return res

    def report_parity(self, res: ParityResult) -> None:
        print(res.line(), flush=True)
        with open(self.dir / "parity.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**res.to_json(), "at": pd.Timestamp.now(tz="UTC").isoformat()}) + "\n")
        if res.mismatches:
            self.alert(f"parity:{res.what}", f"{res.line()} ({res.what}); first: {res.details[:3]}")


# ------------------------------------------------------------------------------------------------------- parity
@dataclass
class ParityResult:
    what: str
    bars: int
    trades: int
    mismatches: int
    details: list[str] = field(default_factory=list)
    slippage: list[float] = field(default_factory=list)

    def line(self) -> str:
        out = f"parity: {self.mismatches} mismatches over {self.bars} bars, {self.trades} trades"
        if self.slippage:
            sl = np.asarray(self.slippage)
            out += f" (broker slippage per fill: mean {sl.mean():+.2f}, max |{np.abs(sl).max():.2f}|)"
        return out

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "bars": self.bars, "trades": self.trades, "mismatches": self.mismatches,
                "details": self.details[:20], "slippage": self.slippage[:200]}


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.isclose(float(a), float(b), rtol=PRICE_RTOL, atol=1e-9, equal_nan=True))


def _compare_trade(mine: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    out = []
    for k in ("entry_time", "exit_time", "side", "exit_reason"):
        if str(mine[k]) != str(ref[k]):
            out.append(f"{k} {mine[k]} != {ref[k]}")
    for k in ("size", "entry_price", "exit_price", "stop", "target", "pnl"):
        if not _close(mine[k], ref[k]):
            out.append(f"{k} {mine[k]} != {ref[k]}")
    return out


def bar_lines(journal: Journal, days: list[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for d in days if days is not None else journal.days():
        out += [x for x in journal.read(d) if x.get("type") == "bar"]
    return out


def _slippage(lines: list[dict[str, Any]]) -> list[float]:
    """Broker fill price minus the simulated fill of the same bar (live mode; >0 = paid more on a buy)."""
    out = []
    for x in lines:
        sims = {f["kind"]: f.get("sim_price") for f in x["fills"] if f["kind"] in ("entry", "exit")}
        for f in x["fills"]:
            if f["kind"].startswith("broker_") and f.get("ok"):
                out.append(float(f["price"]) - float(f.get("requested_price", f["price"])))
        del sims
    return out


def parity_day(folder: Path, day: str, paths: Paths, deployed: Deployed, mode: str) -> ParityResult:
    """Re-run the backtester over the journaled bars of ``day`` from the saved start state of that day and compare
    bar by bar: decision, order size, and every closed trade (times, side, size, prices, reason, pnl).

    The backtester's side: :func:`backtest.engine.prepare_arrays` on the day's window + bars (features from
    ``build_features`` over the whole stretch, the predictions in one batch) and the rules from the saved State,
    i.e. ``backtest.engine.run_replay`` (the kernel starts from a fresh account; the parity test proves the two
    drivers equal)."""
    from backtest.engine import prepare_arrays
    from market.features import build_features

    journal = Journal(folder, fsync=False)
    snap_path = folder / "days" / f"{day}.json"
    if not snap_path.exists():
        raise UserError(f"{snap_path}: no start state for {day} (was the bot running that day?)")
    snap = json.loads(snap_path.read_text(encoding="utf-8"))
    lines = bar_lines(journal, [day])
    if not lines:
        raise UserError(f"{journal.path(day)}: no journaled bars for {day}")
    sets = {x["set"] for x in lines}
    checked = [x for x in lines if x["set"] == deployed.id]
    details: list[str] = []
    if len(checked) < len(lines):
        details.append(f"{len(lines) - len(checked)} bar(s) traded by another set ({sorted(sets - {deployed.id})}) "
                       f"not replayed")
        if not checked:
            return ParityResult(day, len(lines), 0, 0, details)
    frame = window_frame(snap["window"])
    bars = pd.DataFrame([{"time": pd.Timestamp(x["bar_values"]["t"]), "open": x["bar_values"]["o"],
                          "high": x["bar_values"]["h"], "low": x["bar_values"]["l"], "close": x["bar_values"]["c"],
                          "tick_volume": x["bar_values"]["v"], "spread": x["bar_values"]["s"], "real_volume": 0.0}
                         for x in lines]).set_index("time")
    candles = pd.concat([frame, bars])
    cfg = deployed.cfg
    A = prepare_arrays(candles, build_features(candles, cfg), deployed.predictor, cfg)
    em = (A.exit_trees, np.arange(A.exit_X.shape[1])) if A.use_exit else None
    first = next(i for i, x in enumerate(lines) if x["set"] == deployed.id)
    state = State.from_dict(snap["state"]) if first == 0 else None
    if state is None:  # a swap in the day: replay from the first bar of this set with the state journaled before it
        details.append("replay starts at the swap (state before it from the previous bar)")
        return ParityResult(day, len(lines), 0, 0, details)
    from backtest.policy import make_params

    tr = Trader(None, None, params=make_params(cfg), state=state, exit_model=em,
                risk_model=A.risk_trees if A.use_risk else None)
    off = len(frame)
    mism = trades = 0
    for k, x in enumerate(lines):
        t = off + k
        rep = tr.on_bar(int(x["bar"]), int(A.index[t].value), A.open[t], A.high[t], A.low[t], A.close[t], A.spread[t],
                        p_long=A.p_long[t], p_short=A.p_short[t], sl_atr=A.sl_atr[t], tp_atr=A.tp_atr[t],
                        use_sltp=A.use_sltp, atr=A.atr[t], exit_market_row=A.exit_X[t],
                        vol_regime=A.vol_regime[t], is_last=bool(x.get("last")))
        bad: list[str] = []
        want_order = x["order"] or {"side": 0, "size": 0.0}
        if rep.order_side != want_order["side"] or not _close(rep.order_size, want_order["size"]):
            bad.append(f"order {rep.order_side}/{rep.order_size} != {want_order['side']}/{want_order['size']}")
        if x["gate"] != "feed_gap" and (GATE_REASONS[rep.gate] if rep.gate >= 0 else None) != x["gate"]:
            bad.append(f"gate {GATE_REASONS.get(rep.gate)} != {x['gate']}")
        if (rep.closed is None) != (x["closed"] is None):
            bad.append(f"trade closed here: backtest {rep.closed is not None}, bot {x['closed'] is not None}")
        elif rep.closed is not None:
            trades += 1
            bad += _compare_trade(x["closed"], _trade_json(rep.closed))
        if mode == "shadow" and not _close(rep.equity, x["equity"]):
            bad.append(f"equity {rep.equity} != {x['equity']}")
        if bad:
            mism += 1
            details.append(f"bar {x['bar']} {x['time']}: " + "; ".join(bad))
    return ParityResult(day, len(lines), trades, mism, details, _slippage(lines) if mode == "live" else [])


def parity_backtest(folder: Path, candles: pd.DataFrame, start: int, end: int, deployed: Deployed) -> ParityResult:
    """A recorded run against ``backtest/run.py`` on the same window: ``run_fast`` (the compiled kernel, features
    from ``build_features`` on the whole file) trade by trade, and the marked equity bar by bar."""
    from backtest.engine import run_fast
    from market.features import build_features

    lines = [x for x in bar_lines(Journal(folder, fsync=False)) if start <= x["bar"] < end]
    res = run_fast(candles, build_features(candles, deployed.cfg), deployed.predictor, deployed.cfg, start, end)
    ref = res.trades
    mine = [x["closed"] for x in lines if x["closed"]]
    details: list[str] = []
    mism = abs(len(mine) - len(ref))
    if mism:
        details.append(f"{len(mine)} trades in the journal, {len(ref)} in the backtest")
    for i, (m, (_, r)) in enumerate(zip(mine, ref.iterrows(), strict=False)):
        rd = {"entry_time": r["entry_time"].isoformat(), "exit_time": r["exit_time"].isoformat(),
              "side": int(r["side"]), "exit_reason": r["exit_reason"], "size": r["size"],
              "entry_price": r["entry_price"], "exit_price": r["exit_price"], "stop": r["stop"],
              "target": r["target"], "pnl": r["pnl"]}
        bad = _compare_trade(m, rd)
        if bad:
            mism += 1
            details.append(f"trade {i}: " + "; ".join(bad))
    if len(lines) != end - start:
        mism += 1
        details.append(f"{len(lines)} journaled bars for a window of {end - start}")
    else:
        eq = np.array([x["equity"] for x in lines])
        off = np.flatnonzero(~np.isclose(eq, res.equity.to_numpy(), rtol=PRICE_RTOL, atol=1e-9))
        if off.size:
            mism += int(off.size)
            details.append(f"equity differs on {off.size} bars, first at bar {lines[int(off[0])]['bar']}")
    return ParityResult("backtest/run.py window", len(lines), len(ref), mism, details)


# ------------------------------------------------------------------------------------------- weekly report
def since_last_deploy(paths: Paths) -> dict[str, Any] | None:
    """What the deployed set did live (every bot folder under ``<root>/live`` except recorded runs) since it was
    deployed, next to what its backtest promised (the OOS evaluation of the run that committed it): the weekly
    report's "since the last deploy" section. None when no bot has journaled anything for this set."""
    manifest, config = fingerprint(paths)
    set_id = f"{manifest[:12]}/{config[:12]}"
    bots: list[dict[str, Any]] = []
    for folder in sorted((paths.root / "live").glob("*")):
        if not (folder / "journal").is_dir() or folder.name.startswith("data-"):
            continue
        lines = [x for x in bar_lines(Journal(folder, fsync=False)) if x.get("set") == set_id]
        if not lines:
            continue
        pnl = [x["closed"]["pnl"] for x in lines if x["closed"]]
        checks = []
        if (folder / "parity.jsonl").exists():
            days = {x["time"][:10] for x in lines}
            checks = [json.loads(x) for x in (folder / "parity.jsonl").read_text().splitlines() if x.strip()]
            checks = [c for c in checks if c.get("what") in days]
        eq0 = lines[0]["equity"]
        bots.append({
            "bot": folder.name, "from": lines[0]["time"], "to": lines[-1]["time"], "bars": len(lines),
            "trades": len(pnl), "net_profit": float(sum(pnl)), "win_rate": (sum(p > 0 for p in pnl) / len(pnl))
            if pnl else None, "return_pct": (lines[-1]["equity"] / eq0 - 1.0) * 100.0 if eq0 else None,
            "parity_checks": len(checks), "parity_mismatches": int(sum(c.get("mismatches", 0) for c in checks)),
            "mismatch_lines": [f"{c['what']}: {c['mismatches']} mismatches" for c in checks if c.get("mismatches")],
        })
    if not bots:
        return None
    promised = None
    for rep in sorted(paths.results.glob("*/report.json"), reverse=True):
        try:
            doc = json.loads(rep.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if doc.get("model_hash") == manifest and (doc.get("decision") or {}).get("action") == "commit":
            promised = {"run_id": doc.get("run_id"), "metrics": (doc.get("evaluation") or {}).get("new_full")}
            break
    return {"set": set_id, "bots": bots, "promised": promised}
