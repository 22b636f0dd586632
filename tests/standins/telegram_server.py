"""A stand-in Telegram Bot API: ``POST /bot<token>/<method>`` for getMe, sendMessage (form-urlencoded) and
sendDocument (multipart), recording every request.

It checks what the real API checks and python-telegram-bot relies on: the token (401 otherwise), text length
(4096) and caption length (1024), and for ``parse_mode=MarkdownV2`` that every reserved character is escaped (the real
API answers 400 "can't parse entities" otherwise); for HTML that no raw ``<`` / bare ``&`` is present. Switches:
``rate_limit_once`` (method names whose first call gets a 429 with ``retry_after``), ``bad_request_once``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs

from tests.standins._http import LocalServer, QuietHandler

MARKDOWN_V2_RESERVED = set("_*[]()~`>#+-=|{}.!")


@dataclass
class Call:
    """One request as the server saw it."""

    method: str
    fields: dict[str, str]
    files: dict[str, tuple[str, bytes]]
    at: float
    status: int = 200


@dataclass
class _State:
    calls: list[Call] = field(default_factory=list)
    next_message_id: int = 1


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def markdown_v2_error(text: str) -> str | None:
    """The real API's complaint about unescaped reserved characters (None when the text parses)."""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch in MARKDOWN_V2_RESERVED:
            return f"Bad Request: can't parse entities: Character '{ch}' is reserved and must be escaped with the " \
                   "preceding '\\'"
        i += 1
    return None


def html_error(text: str) -> str | None:
    if "<" in text:
        return "Bad Request: can't parse entities: Unsupported start tag"
    i = text.find("&")
    while i != -1:
        if not any(text.startswith(e, i) for e in ("&lt;", "&gt;", "&amp;", "&quot;", "&#")):
            return "Bad Request: can't parse entities: Unknown entity"
        i = text.find("&", i + 1)
    return None


class TelegramStandIn(LocalServer):
    """Use as a context manager; ``base_url`` is what ``Bot(token, base_url=...)`` takes."""

    def __init__(self, token: str = "123456:standin-token", retry_after: int = 1) -> None:
        self.token = token
        self.retry_after = retry_after
        self.rate_limit_once: set[str] = set()
        self.bad_request_once: set[str] = set()
        self.state = _State()
        self._lock = threading.Lock()
        self._init_server(_make_handler(self), "telegram-standin")

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/bot"

    @property
    def calls(self) -> list[Call]:
        return list(self.state.calls)

    def delivered(self, method: str) -> list[Call]:
        """Successful calls of one method, in order."""
        return [c for c in self.state.calls if c.method == method and c.status == 200]

    def handle(self, path: str, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        fields, files = _parse_body(content_type, body)
        prefix = "/bot"
        token, _, method = path[len(prefix):].partition("/") if path.startswith(prefix) else ("", "", "")
        call = Call(method, fields, files, time.monotonic())
        with self._lock:
            self.state.calls.append(call)
            if token != self.token:
                call.status = 401
                return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
            if method in self.rate_limit_once:
                self.rate_limit_once.discard(method)
                call.status = 429
                return 429, {"ok": False, "error_code": 429,
                             "description": f"Too Many Requests: retry after {self.retry_after}",
                             "parameters": {"retry_after": self.retry_after}}
            if method in self.bad_request_once:
                self.bad_request_once.discard(method)
                call.status = 400
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: stand-in says no"}
            status, payload = self._method(method, fields, files)
            call.status = status
            return status, payload

    def _bad(self, description: str) -> tuple[int, dict[str, Any]]:
        return 400, {"ok": False, "error_code": 400, "description": description}

    def _message(self, chat_id: str, **extra: Any) -> dict[str, Any]:
        mid = self.state.next_message_id
        self.state.next_message_id += 1
        return {"message_id": mid, "date": int(time.time()), "chat": {"id": int(chat_id), "type": "private"}, **extra}

    def _check_markup(self, text: str, parse_mode: str | None) -> str | None:
        if parse_mode == "MarkdownV2":
            return markdown_v2_error(text)
        if parse_mode == "HTML":
            return html_error(text)
        return None

    def _method(self, method: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]]
                ) -> tuple[int, dict[str, Any]]:
        if method == "getMe":
            return 200, {"ok": True, "result": {"id": 123456, "is_bot": True, "first_name": "StandIn",
                                                "username": "standin_bot"}}
        if method == "sendMessage":
            text = fields.get("text", "")
            if not text.strip():
                return self._bad("Bad Request: message text is empty")
            if _utf16_len(text) > 4096:
                return self._bad("Bad Request: message is too long")
            if err := self._check_markup(text, fields.get("parse_mode")):
                return self._bad(err)
            return 200, {"ok": True, "result": self._message(fields["chat_id"], text=text)}
        if method == "sendDocument":
            caption = fields.get("caption", "")
            if _utf16_len(caption) > 1024:
                return self._bad("Bad Request: message caption is too long")
            if err := self._check_markup(caption, fields.get("parse_mode")):
                return self._bad(err)
            if "document" not in files:
                return self._bad("Bad Request: there is no document in the request")
            name, _data = files["document"]
            doc = {"file_id": f"doc{self.state.next_message_id}", "file_unique_id": f"u{self.state.next_message_id}",
                   "file_name": name}
            return 200, {"ok": True, "result": self._message(fields["chat_id"], document=doc, caption=caption)}
        return 404, {"ok": False, "error_code": 404, "description": "Not Found"}


def _parse_body(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    if content_type.startswith("application/x-www-form-urlencoded"):
        return {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}, {}
    if content_type.startswith("multipart/form-data"):
        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        fields: dict[str, str] = {}
        files: dict[str, tuple[str, bytes]] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_filename()
            data = part.get_payload(decode=True) or b""
            if filename is not None:
                files[str(name)] = (filename, data)
            else:
                fields[str(name)] = data.decode()
        return fields, files
    if content_type.startswith("application/json"):
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in json.loads(body or b"{}").items()}, {}
    return {}, {}


def _make_handler(server: TelegramStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        def do_POST(self) -> None:  # noqa: N802
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            try:
                status, payload = server.handle(self.path, self.headers.get("Content-Type", ""), body)
            except Exception as exc:  # a bug in the stand-in: visible as a 500 with the reason
                status, payload = 500, {"ok": False, "error_code": 500, "description": f"stand-in crashed: {exc!r}"}
            data = json.dumps(payload).encode()
            self.reply(status, {"Content-Type": "application/json"}, data)

        do_GET = do_POST  # noqa: N815 - getMe may be sent either way

    return Handler
