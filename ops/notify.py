"""Reports to the user: always into a file under ``results/<run>/``, and to Telegram when a bot is configured.

Rules that shape this module:

- A notification failure never fails the run or changes what was decided: :meth:`Notifier.send` never raises, it
  returns False and logs one warning. The file copy is written first and independently of Telegram.
- Telegram's limits are enforced here, not hoped for: text is escaped for the parse mode (MarkdownV2 / HTML), split
  into messages of at most 4096 characters (counted after escaping, in UTF-16 units as Telegram counts them), at most
  ``max_messages`` of them (the rest is cut with a note pointing to the file), captions at most 1024.
- Flood control: a 429 ``RetryAfter`` is waited out when the wait is bounded (``max_retry_after_s``); ``TimedOut`` /
  ``NetworkError`` are retried a couple of times with back-off; anything else (bad token, chat not found) gives up
  at once. If Telegram still rejects the markup, the same text is sent once more as plain text.
- The bot token is part of every Bot API URL, and ``httpx`` logs URLs at INFO: a logging filter scrubs it from the
  records of the libraries involved, and our own messages go through :func:`core.config.redact`.
"""

from __future__ import annotations

import asyncio
import html
import logging
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from core.config import redact, secrets
from core.paths import Paths

if TYPE_CHECKING:
    from core.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")

TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
UPLOAD_LIMIT_BYTES = 50 * 1024 * 1024
TRUNCATION_NOTE = "\n… (truncated: the full report is in the results folder)"
_LIBRARY_LOGGERS = ("httpx", "httpcore", "telegram", "telegram.Bot", "telegram.request", "telegram.ext")


class Notifier(ABC):
    """Something that delivers a report. ``send`` never raises (see the module docstring)."""

    @abstractmethod
    def send(self, text: str, attachments: Sequence[Path] = ()) -> bool:
        """Deliver ``text`` plus attachments; True when everything arrived."""

    def describe(self) -> str:
        return type(self).__name__


# --------------------------------------------------------------------------------------------------- file
class FileNotifier(Notifier):
    """Appends every report to a Markdown file (the copy that is always there, even without Telegram)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return f"file {self.path}"

    def send(self, text: str, attachments: Sequence[Path] = ()) -> bool:
        try:
            stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            lines = [f"## {stamp}", "", redact(text).rstrip(), ""]
            if attachments:
                lines += ["Attachments:", *[f"- {Path(a).name} (`{a}`)" for a in attachments], ""]
            lines += ["---", ""]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
            return True
        except Exception as exc:  # never let a report break the run
            log.warning("could not write the notification to %s: %s", self.path, redact(str(exc)))
            return False


# --------------------------------------------------------------------------------------------------- splitting
def escape_for(parse_mode: str | None) -> Callable[[str], str]:
    """The escaping function for a parse mode: everything becomes literal text."""
    if parse_mode == "MarkdownV2":
        from telegram.helpers import escape_markdown

        return lambda s: escape_markdown(s, version=2)
    if parse_mode == "HTML":
        return lambda s: html.escape(s, quote=False)
    return lambda s: s


@lru_cache(maxsize=8)
def _cost_fn(parse_mode: str | None) -> Callable[[str], int]:
    """Length one character takes after escaping, in UTF-16 units (both escapers work character by character)."""
    esc = escape_for(parse_mode)

    @lru_cache(maxsize=4096)
    def cost(ch: str) -> int:
        return len(esc(ch).encode("utf-16-le")) // 2

    return cost


def telegram_length(text: str, parse_mode: str | None = None) -> int:
    """Length of ``text`` as Telegram counts it after escaping for ``parse_mode``."""
    cost = _cost_fn(parse_mode)
    return sum(cost(ch) for ch in text)


def _cut(text: str, limit: int, parse_mode: str | None) -> tuple[str, str]:
    """The longest prefix whose escaped length fits ``limit``, and the rest."""
    cost = _cost_fn(parse_mode)
    used = 0
    for i, ch in enumerate(text):
        used += cost(ch)
        if used > limit:
            return text[:i], text[i:]
    return text, ""


def split_message(text: str, parse_mode: str | None, limit: int = TEXT_LIMIT, max_parts: int = 5) -> list[str]:
    """Split raw ``text`` into at most ``max_parts`` raw chunks, each within ``limit`` once escaped.

    Splits at line ends where possible (a report's lines stay whole), inside a line only when one line alone is too
    long. When more parts would be needed the last one ends with :data:`TRUNCATION_NOTE`.
    """
    if limit <= telegram_length(TRUNCATION_NOTE, parse_mode):
        raise ValueError("limit too small")
    parts: list[str] = []
    cur, cur_len = "", 0
    for line in text.splitlines(keepends=True):
        n = telegram_length(line, parse_mode)
        if cur_len + n <= limit:
            cur, cur_len = cur + line, cur_len + n
            continue
        if cur:
            parts.append(cur)
        cur, cur_len = "", 0
        while telegram_length(line, parse_mode) > limit:
            head, line = _cut(line, limit, parse_mode)
            parts.append(head)
        cur, cur_len = line, telegram_length(line, parse_mode)
    if cur:
        parts.append(cur)
    parts = [p.strip("\n") for p in parts]
    parts = [p for p in parts if p.strip()]
    if len(parts) > max_parts:
        parts = parts[:max_parts]
        room = limit - telegram_length(TRUNCATION_NOTE, parse_mode)
        parts[-1] = _cut(parts[-1], room, parse_mode)[0].rstrip() + TRUNCATION_NOTE
    return parts


# --------------------------------------------------------------------------------------------------- telegram
class _ScrubFilter(logging.Filter):
    """Replaces a secret in log records of third-party loggers (httpx logs every URL, the token is in it)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        if self.secret in message:
            record.msg = message.replace(self.secret, "***")
            record.args = None
        return True


_installed_filters: dict[str, _ScrubFilter] = {}


def _install_scrub_filter(secret: str) -> None:
    if len(secret) < 4 or secret in _installed_filters:
        return
    flt = _ScrubFilter(secret)
    _installed_filters[secret] = flt
    names = set(_LIBRARY_LOGGERS)
    try:  # the exact names python-telegram-bot logs under
        import telegram._bot as tg_bot
        import telegram.request._baserequest as tg_base
        import telegram.request._httpxrequest as tg_httpx

        names |= {tg_bot.Bot._LOGGER.name, tg_base._LOGGER.name, tg_httpx._LOGGER.name}
    except (ImportError, AttributeError):
        pass
    for name in names:
        logging.getLogger(name).addFilter(flt)


def _run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run`` from plain code; from inside a running loop, on a helper thread (a loop can't nest)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name="telegram-send")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class TelegramNotifier(Notifier):
    """Sends reports through python-telegram-bot's async ``Bot`` (see the module docstring for the rules)."""

    def __init__(self, token: str, chat_id: str | int, base_url: str | None = None,
                 parse_mode: str | None = "MarkdownV2", timeout: float = 20.0, retries: int = 2,
                 retry_delay_s: float = 1.0, max_retry_after_s: float = 60.0, max_messages: int = 5) -> None:
        if not token:
            raise ValueError("a Telegram token is required")
        self._token = token
        self.chat_id = chat_id
        self.base_url = base_url or "https://api.telegram.org/bot"
        self.parse_mode = None if parse_mode in (None, "none") else parse_mode
        self.timeout = timeout
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.max_retry_after_s = max_retry_after_s
        self.max_messages = max_messages
        _install_scrub_filter(token)

    def describe(self) -> str:
        return f"Telegram chat {self.chat_id} via {self._scrub(self.base_url)}"

    def _scrub(self, text: str) -> str:
        return redact(text).replace(self._token, "***")

    def send(self, text: str, attachments: Sequence[Path] = ()) -> bool:
        from telegram.warnings import PTBDeprecationWarning

        try:
            with warnings.catch_warnings():
                # RetryAfter's own constructor warns about its int/timedelta migration; _seconds handles both
                warnings.simplefilter("ignore", PTBDeprecationWarning)
                return _run(lambda: self._send(text, [Path(a) for a in attachments]))
        except Exception as exc:  # never let a report break the run
            log.warning("Telegram notification failed: %s: %s", type(exc).__name__, self._scrub(str(exc)))
            return False

    def _request(self) -> Any:
        from telegram.request import HTTPXRequest

        connect = min(self.timeout, 10.0)
        return HTTPXRequest(connection_pool_size=4, connect_timeout=connect, read_timeout=self.timeout,
                            write_timeout=self.timeout, media_write_timeout=max(self.timeout, 20.0),
                            pool_timeout=self.timeout)

    async def _send(self, text: str, attachments: list[Path]) -> bool:
        from telegram import Bot

        bot = Bot(self._token, base_url=self.base_url, request=self._request(), get_updates_request=self._request())
        ok = True
        try:
            await self._retrying("getMe", bot.initialize)  # also checks the token
            for chunk in split_message(text, self.parse_mode, TEXT_LIMIT, self.max_messages):
                ok &= await self._send_text(bot, chunk)
            title = next((line.strip() for line in text.splitlines() if line.strip()), "report")
            for path in attachments:
                ok &= await self._send_document(bot, path, title)
        finally:
            await bot.shutdown()
        return ok

    async def _send_text(self, bot: Any, chunk: str) -> bool:
        from telegram.error import BadRequest

        escaped = escape_for(self.parse_mode)(chunk)
        try:
            await self._retrying("sendMessage", lambda: bot.send_message(
                chat_id=self.chat_id, text=escaped, parse_mode=self.parse_mode, disable_web_page_preview=True))
            return True
        except BadRequest as exc:
            if self.parse_mode is None or "parse entities" not in str(exc):
                raise
            log.warning("Telegram rejected the %s markup (%s); sending as plain text", self.parse_mode, exc)
            plain = split_message(chunk, None, TEXT_LIMIT, 1)[0]
            await self._retrying("sendMessage", lambda: bot.send_message(chat_id=self.chat_id, text=plain))
            return True

    async def _send_document(self, bot: Any, path: Path, title: str) -> bool:
        if not path.is_file():
            log.warning("attachment %s does not exist; not sent", path)
            return False
        if path.stat().st_size > UPLOAD_LIMIT_BYTES:
            log.warning("attachment %s is larger than Telegram's 50 MB upload limit; not sent", path)
            return False
        raw_caption = f"{title} · {path.name}"
        caption = escape_for(self.parse_mode)(split_message(raw_caption, self.parse_mode, CAPTION_LIMIT, 1)[0])
        await self._retrying("sendDocument", lambda: bot.send_document(
            chat_id=self.chat_id, document=path, filename=path.name, caption=caption, parse_mode=self.parse_mode))
        return True

    async def _retrying(self, what: str, call: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """RetryAfter: wait (bounded) and retry; TimedOut/NetworkError: back-off retries; other errors: raise."""
        from telegram.error import BadRequest, Forbidden, InvalidToken, NetworkError, RetryAfter, TimedOut

        failures = 0
        flood_waits = 0
        while True:
            try:
                return await call()
            except RetryAfter as exc:
                wait = _seconds(exc)
                flood_waits += 1
                if wait > self.max_retry_after_s or flood_waits > 3:
                    raise
                log.warning("Telegram %s: flood control, waiting %.1fs", what, wait)
                await asyncio.sleep(wait)
            except (BadRequest, Forbidden, InvalidToken):
                raise
            except (TimedOut, NetworkError) as exc:
                failures += 1
                if failures > self.retries:
                    raise
                delay = self.retry_delay_s * 2 ** (failures - 1)
                log.warning("Telegram %s failed (%s: %s); retry %d/%d in %.2fs", what, type(exc).__name__,
                            self._scrub(str(exc)), failures, self.retries, delay)
                await asyncio.sleep(delay)


def _seconds(exc: Any) -> float:
    """``RetryAfter.retry_after`` as seconds (an int or a timedelta depending on PTB_TIMEDELTA)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


# --------------------------------------------------------------------------------------------------- composite
class CompositeNotifier(Notifier):
    """Sends to every notifier in order (the file first); True only when all of them succeeded."""

    def __init__(self, notifiers: Sequence[Notifier]) -> None:
        self.notifiers = list(notifiers)

    def describe(self) -> str:
        return " + ".join(n.describe() for n in self.notifiers)

    def send(self, text: str, attachments: Sequence[Path] = ()) -> bool:
        ok = True
        for n in self.notifiers:
            t0 = time.monotonic()
            try:
                sent = n.send(text, attachments)
            except Exception as exc:  # a notifier that breaks its own promise still must not break the run
                log.warning("%s raised %s: %s", n.describe(), type(exc).__name__, redact(str(exc)))
                sent = False
            log.info("notification via %s: %s (%.1fs)", n.describe(), "sent" if sent else "FAILED",
                     time.monotonic() - t0)
            ok &= sent
        return ok


def make_notifier(cfg: Config, paths: Paths, run_dir: Path) -> Notifier:
    """The file ``<run_dir>/notifications.md`` always, plus Telegram when TELEGRAM_TOKEN and TELEGRAM_CHAT_ID are set.

    ``paths`` is accepted for symmetry with the other factories (reports live under ``run_dir``).
    """
    del paths
    notifiers: list[Notifier] = [FileNotifier(Path(run_dir) / "notifications.md")]
    env = secrets(["TELEGRAM_TOKEN", "TELEGRAM_CHAT_ID"])
    if "TELEGRAM_TOKEN" in env and "TELEGRAM_CHAT_ID" in env:
        notifiers.append(TelegramNotifier(
            env["TELEGRAM_TOKEN"], env["TELEGRAM_CHAT_ID"], base_url=cfg.telegram.base_url,
            parse_mode=cfg.telegram.parse_mode, timeout=cfg.telegram.timeout_s,
        ))
    elif env:
        log.warning("only one of TELEGRAM_TOKEN / TELEGRAM_CHAT_ID is set: reports go to the file only")
    return CompositeNotifier(notifiers)
