"""The HTTP plumbing every stand-in server shares: a quiet, low-latency handler base and a local server thread.

Why one place: each stand-in answers real client libraries over 127.0.0.1, and each needs the same details right
(HTTP/1.1 keep-alive, TCP_NODELAY, no log noise in test output, a clean shutdown); written twice they drift.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, TCP_NODELAY, no request log; :meth:`reply` sends one complete answer."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle + delayed ACK add 40 ms per request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def reply(self, status: int, headers: Mapping[str, str], data: bytes, *, send_body: bool = True) -> None:
        """Status, ``headers``, Content-Length and (unless ``send_body`` is False, as for HEAD) ``data``."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)


class LocalServer:
    """A threading HTTP server on a free port of 127.0.0.1, served from a daemon thread inside a ``with`` block."""

    def _init_server(self, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=name, daemon=True)

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
