"""ops.notify: the real python-telegram-bot client against a stand-in Bot API on 127.0.0.1, and the file notifier."""

from __future__ import annotations

import asyncio
import html
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from telegram.helpers import escape_markdown

from core.config import default_config
from core.paths import Paths
from ops.notify import (
    TRUNCATION_NOTE,
    CompositeNotifier,
    FileNotifier,
    TelegramNotifier,
    make_notifier,
    split_message,
    telegram_length,
)
from tests.standins.telegram_server import TelegramStandIn, markdown_v2_error

CHAT = 4242
REPORT = (
    "✅ BTCUSD weekly optimizer: COMMIT (run 2026-11-08_0200)\n"
    "score 1.23 → 1.31 (+6.5%), gate: new > baseline × 1.02 [ok]\n"
    "holdout: PF 1.4, trades 140, max DD 7.5% | sessions {london, new_york}\n"
    "config: risk_percent 1.0 → 1.5; sl_multiplier 1.2 (unchanged)\n"
    "model hash sha256:ab12… <manifest.json> & report.md!\n"
)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


@pytest.fixture
def tg() -> Iterator[TelegramStandIn]:
    with TelegramStandIn() as server:
        yield server


def _notifier(tg: TelegramStandIn, **kw: object) -> TelegramNotifier:
    kw.setdefault("retry_delay_s", 0.01)
    return TelegramNotifier(tg.token, CHAT, base_url=tg.base_url, timeout=5.0, **kw)  # type: ignore[arg-type]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------- splitting
@pytest.mark.parametrize("mode", ["MarkdownV2", "HTML", None])
def test_split_message_fits_and_keeps_everything(mode: str | None) -> None:
    text = "\n".join(f"line {i}: a.b-c_d (x) [y] <z> & {'*' * (i % 7)} 🚀" for i in range(400))
    parts = split_message(text, mode, limit=1000, max_parts=100)
    assert len(parts) > 1
    assert all(telegram_length(p, mode) <= 1000 for p in parts)
    assert "\n".join(parts) == text  # split at line ends only; nothing lost
    one_line = "x." * 3000
    parts = split_message(one_line, mode, limit=1000, max_parts=100)
    assert "".join(parts) == one_line and all(telegram_length(p, mode) <= 1000 for p in parts)
    cut = split_message(text, mode, limit=1000, max_parts=3)
    assert len(cut) == 3 and cut[-1].endswith(TRUNCATION_NOTE)
    assert telegram_length(cut[-1], mode) <= 1000


def test_telegram_length_counts_escapes_and_utf16() -> None:
    assert telegram_length("a.b", "MarkdownV2") == 4
    assert telegram_length("<&>", "HTML") == len("&lt;&amp;&gt;")
    assert telegram_length("🚀", None) == 2  # outside the BMP: two UTF-16 units, as Telegram counts


# --------------------------------------------------------------------------------------------------- telegram
def test_message_and_document_arrive_escaped(tg: TelegramStandIn, tmp_path: Path) -> None:
    png = tmp_path / "equity.png"
    png.write_bytes(PNG)
    assert _notifier(tg).send(REPORT, [png]) is True
    methods = [c.method for c in tg.calls]
    assert methods == ["getMe", "sendMessage", "sendDocument"]
    msg = tg.delivered("sendMessage")[0]
    assert msg.fields["chat_id"] == str(CHAT)
    assert msg.fields["parse_mode"] == "MarkdownV2"
    assert msg.fields["text"] == escape_markdown(REPORT.strip("\n"), version=2)
    assert markdown_v2_error(msg.fields["text"]) is None
    doc = tg.delivered("sendDocument")[0]
    assert doc.fields["chat_id"] == str(CHAT)
    assert doc.files["document"] == ("equity.png", PNG)
    caption = doc.fields["caption"]
    assert caption == escape_markdown("✅ BTCUSD weekly optimizer: COMMIT (run 2026-11-08_0200) · equity.png", 2)
    assert len(caption) <= 1024


@pytest.mark.parametrize("mode", ["HTML", "none"])
def test_other_parse_modes(tg: TelegramStandIn, mode: str) -> None:
    assert _notifier(tg, parse_mode=mode).send(REPORT) is True
    msg = tg.delivered("sendMessage")[0]
    if mode == "HTML":
        assert msg.fields["parse_mode"] == "HTML"
        assert msg.fields["text"] == html.escape(REPORT.strip("\n"), quote=False)
    else:
        assert "parse_mode" not in msg.fields
        assert msg.fields["text"] == REPORT.strip("\n")


def test_long_report_is_split_within_limits(tg: TelegramStandIn) -> None:
    text = "\n".join(f"{i:04d} | trade +1.5% (sl=1.2, tp=2.0) [london] - ok!" for i in range(400))
    assert _notifier(tg, max_messages=20).send(text) is True
    sent = tg.delivered("sendMessage")
    assert len(sent) > 1
    assert all(len(c.fields["text"]) <= 4096 for c in sent)
    assert not [c for c in tg.calls if c.status != 200]  # the stand-in accepted every part
    unescaped = "\n".join(c.fields["text"].replace("\\", "") for c in sent)
    assert unescaped == text


def test_429_retry_after_is_honoured(tg: TelegramStandIn) -> None:
    tg.rate_limit_once = {"sendMessage"}
    assert _notifier(tg).send("hello") is True
    attempts = [c for c in tg.calls if c.method == "sendMessage"]
    assert [c.status for c in attempts] == [429, 200]
    assert len(tg.delivered("sendMessage")) == 1  # arrives once
    assert attempts[1].at - attempts[0].at >= 0.95  # after the requested wait


def test_retry_after_beyond_the_bound_gives_up(tg: TelegramStandIn) -> None:
    tg.rate_limit_once = {"sendMessage"}
    tg.retry_after = 30
    t0 = time.monotonic()
    assert _notifier(tg, max_retry_after_s=2).send("hello") is False
    assert time.monotonic() - t0 < 2


def test_dead_server_returns_false_quickly(caplog: pytest.LogCaptureFixture) -> None:
    n = TelegramNotifier("999:dead-token-value", CHAT, base_url=f"http://127.0.0.1:{_closed_port()}/bot",
                         timeout=2.0, retries=2, retry_delay_s=0.01)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert n.send("hello", []) is False
    assert time.monotonic() - t0 < 3
    assert "Telegram notification failed" in caplog.text
    assert "dead-token-value" not in caplog.text


def test_bad_token_gives_up_at_once_and_never_logs_it(tg: TelegramStandIn, caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    n = TelegramNotifier("777:wrong-secret-token", CHAT, base_url=tg.base_url, retry_delay_s=0.01)
    with caplog.at_level(logging.DEBUG):
        assert n.send("hello") is False
    assert [c.method for c in tg.calls] == ["getMe"]  # InvalidToken is not retried
    messages = [r.getMessage() for r in caplog.records]
    assert any("rejected" in m for m in messages)
    assert not any("wrong-secret-token" in m for m in messages)


def test_token_absent_from_library_logs(tg: TelegramStandIn, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        assert _notifier(tg).send("hello") is True
    messages = [r.getMessage() for r in caplog.records]
    assert any("sendMessage" in m for m in messages)  # httpx did log the request URLs ...
    assert not any(tg.token in m for m in messages)  # ... with the token scrubbed


def test_send_from_inside_a_running_loop(tg: TelegramStandIn) -> None:
    async def main() -> bool:
        return _notifier(tg).send("from async code")

    assert asyncio.run(main()) is True
    assert tg.delivered("sendMessage")[0].fields["text"] == "from async code"


# --------------------------------------------------------------------------------------------------- file + factory
def test_file_notifier_appends(tmp_path: Path) -> None:
    path = tmp_path / "results" / "run1" / "notifications.md"
    n = FileNotifier(path)
    assert n.send("first report", [tmp_path / "equity.png"])
    assert n.send("second *report*")
    text = path.read_text(encoding="utf-8")
    assert text.index("first report") < text.index("second *report*")
    assert "equity.png" in text and text.count("---") == 2
    assert FileNotifier(tmp_path / "results" / "run1" / "notifications.md" / "x").send("y") is False  # no raise


def test_make_notifier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = default_config()
    paths = Paths.of(tmp_path)
    run_dir = tmp_path / "results" / "run1"
    monkeypatch.delenv("TELEGRAM_TOKEN", raising=False)
    monkeypatch.delenv("TELEGRAM_CHAT_ID", raising=False)
    n = make_notifier(cfg, paths, run_dir)
    assert isinstance(n, CompositeNotifier) and [type(x) for x in n.notifiers] == [FileNotifier]
    assert n.send("file only") and "file only" in (run_dir / "notifications.md").read_text()
    # with Telegram configured but unreachable: the file still gets the report, the run goes on
    monkeypatch.setenv("TELEGRAM_TOKEN", "555:env-token-secret")
    monkeypatch.setenv("TELEGRAM_CHAT_ID", str(CHAT))
    cfg.telegram.base_url = f"http://127.0.0.1:{_closed_port()}/bot"
    cfg.telegram.timeout_s = 2.0
    n = make_notifier(cfg, paths, run_dir)
    assert [type(x) for x in n.notifiers] == [FileNotifier, TelegramNotifier]
    tele = n.notifiers[1]
    assert isinstance(tele, TelegramNotifier)
    tele.retry_delay_s = 0.01
    assert "env-token-secret" not in n.describe()
    assert n.send("both") is False
    assert "both" in (run_dir / "notifications.md").read_text()


def test_make_notifier_delivers_to_standin(tg: TelegramStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    cfg = default_config()
    cfg.telegram.base_url = tg.base_url
    cfg.telegram.parse_mode = "HTML"
    monkeypatch.setenv("TELEGRAM_TOKEN", tg.token)
    monkeypatch.setenv("TELEGRAM_CHAT_ID", str(CHAT))
    n = make_notifier(cfg, Paths.of(tmp_path), tmp_path / "run")
    assert n.send("a < b & c") is True
    assert tg.delivered("sendMessage")[0].fields["text"] == "a &lt; b &amp; c"


def test_telegram_text_times_a_phase_still_running_as_zero_seconds() -> None:
    """The text is built during phase 13, whose seconds are still None: it must read "13:0s", not "13:Nones"."""
    from ops.report import telegram_text

    text = telegram_text({"run_id": "r1", "decision": {"action": "commit", "reason": "better"},
                          "phases": [{"number": 13, "seconds": None}, {"number": 1, "seconds": 2.6}]})
    assert "Phases: 1:3s, 13:0s" in text
    assert "None" not in text
