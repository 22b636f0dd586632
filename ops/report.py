"""The run report: one JSON for machines, one Markdown page for people, built from the same dict.

Why one dict: the Telegram message, report.md and report.json must never disagree about what was decided. Phases
add their summaries to :class:`RunReport`; :func:`render_markdown` and :func:`telegram_text` only format it.
Secrets never reach a report: every string goes through :func:`core.config.redact` on save.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.config import redact
from core.io import atomic_write_text

log = logging.getLogger("weekly")


def _fmt(v: Any, nd: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


class RunReport:
    """Accumulates everything a run did; saved after every phase so a killed run still leaves its report."""

    def __init__(self, run_dir: Path, run_id: str, demo: bool) -> None:
        self.run_dir = run_dir
        self.data: dict[str, Any] = {"run_id": run_id, "demo": demo, "phases": [], "decision": None}
        path = run_dir / "report.json"
        if path.exists():  # --resume continues the same report
            self.data = json.loads(path.read_text())

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    @contextmanager
    def phase(self, number: int, name: str) -> Iterator[dict[str, Any]]:
        """Log start/end/duration of one phase and record its outcome (the yielded dict is its summary)."""
        summary: dict[str, Any] = {}
        t0 = time.perf_counter()
        log.info("phase %2d %-22s start", number, name)
        entry = {"number": number, "name": name, "status": "running", "seconds": None, "summary": summary}
        self.data["phases"] = [p for p in self.data["phases"] if p["number"] != number] + [entry]
        try:
            yield summary
        except BaseException as exc:
            entry["status"] = "failed"
            entry["error"] = redact(str(exc))[:500]
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            log.error("phase %2d %-22s FAILED after %.1fs: %s", number, name, entry["seconds"], entry["error"])
            self.save()
            raise
        entry["status"] = "ok"
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        log.info("phase %2d %-22s done in %.1fs", number, name, entry["seconds"])
        self.save()

    def phase_table(self) -> list[tuple[int, str, str, float | None]]:
        return [(p["number"], p["name"], p["status"], p["seconds"]) for p in sorted(self.data["phases"],
                                                                                    key=lambda p: p["number"])]

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_redacted(self.data), indent=2, default=str)  # string leaves only: JSON stays valid
        atomic_write_text(self.run_dir / "report.json", text)
        atomic_write_text(self.run_dir / "report.md", redact(render_markdown(self.data)))


def _redacted(obj: Any) -> Any:
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: _redacted(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redacted(v) for v in obj]
    return obj


def _metrics_rows(label: str, m: dict[str, Any] | None) -> str:
    if not m:
        return f"| {label} | - | - | - | - | - | - |\n"
    return (f"| {label} | {_fmt(m.get('score'))} | {_fmt(m.get('return_pct'), 2)} | "
            f"{_fmt(m.get('max_drawdown_pct'), 2)} | {m.get('trades', '-')} | "
            f"{_fmt(m.get('sharpe'), 2)} | {_fmt(m.get('profit_factor'), 2)} |\n")


def render_markdown(d: dict[str, Any]) -> str:
    """The human report."""
    demo = " (DEMO DATA: synthetic candles, not a market)" if d.get("demo") else ""
    lines = [f"# Weekly optimizer run {d.get('run_id')}{demo}\n"]
    dec = d.get("decision") or {}
    if dec:
        lines.append(f"**Decision: {dec.get('action', '?').upper()}** — {dec.get('reason', '')}\n")
    data = d.get("data")
    if data:
        lines.append(f"Data: {data.get('source')} — {data.get('rows')} bars, {data.get('start')} → {data.get('end')}; "
                     f"gaps: {len(data.get('gaps', []))}, spikes flagged: {data.get('spikes', 0)}\n")
    lines.append("## Phases\n\n| # | phase | status | seconds |\n|---|---|---|---|")
    for p in sorted(d.get("phases", []), key=lambda p: p["number"]):
        lines.append(f"| {p['number']} | {p['name']} | {p['status']} | {_fmt(p.get('seconds'), 1)} |")
    total = sum(p.get("seconds") or 0 for p in d.get("phases", []))
    lines.append(f"| | **total** | | {total:.1f} |\n")
    ev = d.get("evaluation") or {}
    if ev:
        lines.append("## Baseline vs new (same OOS window)\n")
        lines.append("| run | score | return % | max DD % | trades | Sharpe | PF |\n|---|---|---|---|---|---|---|")
        lines.append(_metrics_rows("baseline, full OOS", ev.get("baseline_full")).rstrip())
        lines.append(_metrics_rows("new, full OOS", ev.get("new_full")).rstrip())
        lines.append(_metrics_rows("baseline, holdout 30%", ev.get("baseline_holdout")).rstrip())
        lines.append(_metrics_rows("new, holdout 30% (never seen by the sweep)", ev.get("new_holdout")).rstrip())
        lines.append("")
        for img in ("equity_baseline_vs_new.png",):
            lines.append(f"![equity]({img})\n")
    lines.extend(why_this_decision(d))
    cfgd = d.get("config_change")
    if cfgd:
        lines.append("## Config: old → chosen\n\n| parameter | old | chosen |\n|---|---|---|")
        for k, (old, new) in cfgd.items():
            lines.append(f"| {k} | {old} | {new} |")
        lines.append("")
    sw = d.get("sweep")
    if sw:
        lines.append(f"## Sweep (first {sw.get('fraction', 0.7):.0%} of OOS only)\n")
        lines.append(f"{sw.get('n_combos')} combinations, {sw.get('n_eligible')} with at least "
                     f"{sw.get('min_trades')} trades. Top rows:\n")
        rows = sw.get("top", [])
        if rows:
            keys = list(rows[0].keys())
            lines.append("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
            for r in rows:
                lines.append("| " + " | ".join(_fmt(r[k], 3) for k in keys) + " |")
        lines.append("\n![sweep](sweep_heatmap.png)\n")
    for key, title in (("optuna_signal", "Optuna: signal ensemble"), ("optuna_position", "Optuna: position model")):
        o = d.get(key)
        if o and o.get("skipped"):
            lines.append(f"## {title}\n\nskipped: {o['skipped']}\n")
        elif o:
            kind = key.split("_", 1)[1]
            lines.append(f"## {title}\n\n{o.get('n_trials')} trials ({o.get('n_pruned', 0)} pruned), best value "
                         f"{_fmt(o.get('best_value'))}, best params `{json.dumps(o.get('best_params'))}`\n")
            lines.append(f"![optuna {kind}](optuna_history_{kind}.png)\n")
    shp = d.get("shap")
    if shp:
        lines.append("## SHAP (report only: nothing is dropped automatically)\n")
        for f in shp.get("flags", []):
            lines.append(f"- {f}")
        lines.append("\n![shap](shap/shap_importance.png)\n")
    models = d.get("models")
    if models:
        lines.append("## Models\n\n| file | sha256 |\n|---|---|")
        for k, v in models.items():
            lines.append(f"| {k} | `{str(v)[:16]}` |")
        lines.append("")
    live = d.get("live")
    if live:
        lines.append(f"## Since the last deploy (live bot, set `{live['set']}`)\n")
        lines.append("| bot | from | to | bars | trades | net profit | return % | win rate | parity checks | "
                     "mismatches |\n|---|---|---|---|---|---|---|---|---|---|")
        for b in live["bots"]:
            lines.append(f"| {b['bot']} | {b['from']} | {b['to']} | {b['bars']} | {b['trades']} | "
                         f"{_fmt(b['net_profit'], 2)} | {_fmt(b['return_pct'], 2)} | {_fmt(b['win_rate'], 3)} | "
                         f"{b['parity_checks']} | {b['parity_mismatches']} |")
        pm = (live.get("promised") or {}).get("metrics")
        if pm:
            lines.append(f"\nIts backtest promised (run {live['promised']['run_id']}, full OOS): "
                         f"return {_fmt(pm.get('return_pct'), 2)} %, max DD {_fmt(pm.get('max_drawdown_pct'), 2)} %, "
                         f"{pm.get('trades')} trades.")
        for b in live["bots"]:
            lines.extend(f"- parity mismatch ({b['bot']}) {m}" for m in b["mismatch_lines"])
        lines.append("")
    if d.get("notes"):
        lines.append("## Notes\n")
        lines.extend(f"- {n}" for n in d["notes"])
    return "\n".join(lines) + "\n"


_NAMES = {"min_trades": "enough trades", "max_drawdown": "drawdown floor", "min_score": "makes money",
          "improvement": "2% better score", "prob_better": "beats the deployed set", "dsr": "better than luck",
          "pbo": "sweep not overfit", "holdout": "holdout not worse"}


def _num(v: Any, nd: int = 3) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _pct(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{100 * v:.4f}%"


def _evidence_line(ev: dict[str, Any], key: str, label: str, text: Callable[[dict[str, Any]], str]) -> str:
    """One bullet for one piece of evidence: ``text(entry)`` when it was computed, else why it was not (every piece
    says the same "not computed (reason)", so that a reader can scan for what is missing)."""
    entry = ev.get(key) or {}
    if entry.get("ok"):
        return f"- {text(entry)}"
    return f"- {label}: not computed ({entry.get('reason')})"


def why_this_decision(d: dict[str, Any]) -> list[str]:
    """The "Why this decision" section: every gate condition with its number, threshold, pass/fail and meaning,
    then the evidence behind them (including the directional skill, which is reported but not gated) and the two
    pictures."""
    gate = d.get("gate")
    if not gate:
        return []
    ev = d.get("evidence") or {}
    mode = gate.get("mode", "seed")
    what = ("the seed rule and floors only" if mode == "seed"
            else "seed rule, floors and the evidence of how much the run searched")
    lines = ["## Why this decision\n",
             f"Gate mode **{mode}** ({what}): **{'PASS' if gate.get('passed') else 'FAIL'}**. "
             f"{gate.get('reason', '')}\n",
             "| condition | number | threshold | result | what it means |", "|---|---|---|---|---|"]
    for c in gate.get("conditions", []):
        lines.append(f"| {_NAMES.get(c['name'], c['name'])} (`{c['name']}`) | {_num(c.get('value'))} | "
                     f"{_num(c.get('threshold'))} | {'pass' if c.get('passed') else '**FAIL**'} | {c.get('meaning')} |")
    lines.append("")
    if ev:
        lines.append("### The evidence\n")
        for key, label in (("paired_full", "Paired bootstrap, full OOS"), ("paired_holdout", "Paired bootstrap, "
                                                                                               "holdout alone")):
            def paired(p: dict[str, Any], label: str = label) -> str:
                ci = p.get("ci95") or [None, None]
                return (f"{label}: P(new beats deployed) = {_num(p.get('prob_better'))} over "
                        f"{p.get('n_days')} days (block {p.get('block')} days, {p.get('resamples')} resamples, "
                        f"seed {p.get('seed')}); mean daily difference {_pct(p.get('observed_mean'))} "
                        f"(95%: {_pct(ci[0])} .. {_pct(ci[1])})")

            lines.append(_evidence_line(ev, key, label, paired))
        lines.append(_evidence_line(ev, "dsr", "Deflated Sharpe ratio", lambda ds: (
            f"Deflated Sharpe ratio {_num(ds.get('dsr'))}: annual Sharpe "
            f"{_num(ds.get('sharpe_annual'), 2)} over {ds.get('n_days')} days "
            f"(skew {_num(ds.get('skew'), 2)}, kurtosis "
            f"{_num(ds.get('kurtosis'), 2)}) against {_num(ds.get('sr0_annual'), 2)}, the best of "
            f"N = {ds.get('n_trials')} pure-luck tries ({ds.get('n_optuna_trials')} Optuna trials + "
            f"{ds.get('n_sweep_rows')} sweep rows; near-copies make N an upper bound)")))
        lines.append(_evidence_line(ev, "pbo", "PBO", lambda pb: (
            f"PBO {_num(pb.get('pbo'))} (CSCV, {pb.get('n_configs')} sweep configurations, "
            f"{pb.get('blocks')} blocks of {pb.get('block_days')} days, {pb.get('n_splits')} splits); "
            f"the in-sample winner lost money out of sample in {_num(pb.get('prob_oos_loss'))} of them")))
        ho = ev.get("holdout") or {}
        for who in ("new", "baseline"):
            m = ho.get(who)
            if m:
                lines.append(f"- Holdout alone, {'new' if who == 'new' else 'deployed'} set: return "
                             f"{_num(m.get('return_pct'), 2)}%, max DD {_num(m.get('max_drawdown_pct'), 2)}%, "
                             f"{m.get('trades')} trades, score {_num(m.get('score'))}")
        lines.extend(_direction_lines(ev.get("direction") or {}))
        lines.append("")
        for img, alt in (("gate_bootstrap.png", "bootstrap"), ("gate_cscv.png", "cscv")):
            if (ev.get("paired_full" if alt == "bootstrap" else "pbo") or {}).get("ok"):
                lines.append(f"![{alt}]({img})\n")
    return lines


def _direction_lines(dr: dict[str, Any]) -> list[str]:
    if not dr:
        return []
    rest = (f"one-vs-rest AUC long {_num(dr.get('long_vs_rest'))}, short {_num(dr.get('short_vs_rest'))} (these "
            f"can exceed 0.5 from timing volatility alone)")
    if not dr.get("ok"):
        return [f"- Directional skill: not computed ({dr.get('reason')}); {rest}"]
    ci = dr.get("ci95") or [None, None]
    verdict = "no directional edge" if ci[0] is not None and ci[0] <= 0.5 else "some directional edge"
    return [f"- Directional skill (reported, not gated): long-vs-short AUC {_num(dr.get('long_vs_short'))} "
            f"(95%: {_num(ci[0])} .. {_num(ci[1])}) over {dr.get('n_decided')} bars where a barrier decided: "
            f"{verdict}; {rest}"]


def telegram_why(d: dict[str, Any]) -> list[str]:
    """The gate's conditions for Telegram: one line each, pass/fail first, in a trader's words."""
    gate = d.get("gate") or {}
    out = [f"Why ({gate.get('mode', 'seed')} gate):"] if gate.get("conditions") else []
    for c in gate.get("conditions", []):
        out.append(f"{'PASS' if c.get('passed') else 'FAIL'} {_NAMES.get(c['name'], c['name'])}: {c.get('meaning')}")
    dr = (d.get("evidence") or {}).get("direction") or {}
    if dr.get("ok"):
        ci = dr.get("ci95") or [None, None]
        out.append(f"Direction (not gated): long-vs-short AUC {_num(dr.get('long_vs_short'))} "
                   f"[{_num(ci[0])}, {_num(ci[1])}]")
    return out


def telegram_text(d: dict[str, Any]) -> str:
    """A compact plain-text summary for Telegram (the notifier escapes it for the parse mode)."""
    dec = d.get("decision") or {}
    ev = d.get("evaluation") or {}
    head = "DEMO " if d.get("demo") else ""
    out = [f"{head}Weekly optimizer {d.get('run_id')}: {dec.get('action', '?').upper()}",
           dec.get("reason", "")]
    out.extend(telegram_why(d))

    def m(label: str, key: str) -> None:
        x = ev.get(key)
        if x:
            out.append(f"{label}: score {_fmt(x.get('score'), 3)}, return {_fmt(x.get('return_pct'), 2)}%, "
                       f"maxDD {_fmt(x.get('max_drawdown_pct'), 2)}%, trades {x.get('trades')}")

    m("Baseline", "baseline_full")
    m("New", "new_full")
    m("New holdout", "new_holdout")
    for k, (old, new) in (d.get("config_change") or {}).items():
        if old != new:
            out.append(f"{k}: {old} -> {new}")
    flags = (d.get("shap") or {}).get("flags", [])
    if flags:
        out.append(f"SHAP flags: {len(flags)} (" + "; ".join(flags[:3]) + ")")
    data = d.get("data") or {}
    if data.get("gaps"):
        out.append(f"Data gaps: {len(data['gaps'])}")
    # the text is built while phase 13 still runs (its seconds are not known yet): "13:0s", never "13:Nones"
    times = ", ".join(f"{p['number']}:{_fmt(float(p.get('seconds') or 0), 0)}s"
                      for p in sorted(d.get("phases", []), key=lambda p: p["number"]))
    out.append(f"Phases: {times}")
    if d.get("model_hash"):
        out.append(f"Models: {str(d['model_hash'])[:16]}")
    return "\n".join(x for x in out if x)
