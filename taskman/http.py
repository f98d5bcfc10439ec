"""uvicorn's fast HTTP parser (httptools), answering bad requests in JSON, with the
request head bounded in size and in time.

httptools refuses some requests before any app sees them (a method it does not
know, bytes past the Content-Length) with a plain-text 400. The contract says every
error is JSON with a ``detail``; h11 would hand those requests to the app, but it
served about a third fewer requests per second here.

uvicorn puts no bound on the head under httptools: a 100 MB header was buffered
whole (RSS 75 -> 252 MB), and a client sending a byte a second was held forever
(its keep-alive timer restarts on every byte, and the first request has none).
So a head larger than ``TASKMAN_MAX_HEADER_BYTES`` is answered 431 and one not
complete ``TASKMAN_HEADER_TIMEOUT`` seconds after it began is answered 408 (or,
if not a byte of it came, just closed), and a connection past
``TASKMAN_MAX_CONNECTIONS`` open ones is answered 503: so slow clients can pin at
most about max_connections x max_header_bytes of memory.

:func:`uvicorn_options` is the one place that says how taskman runs uvicorn: both
``taskman serve`` and the tools (:func:`taskman.processes.api_command`) use it.
"""

import asyncio
import json
from functools import cache
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from common.settings import Settings

PROTOCOL = "taskman.http:JSONErrorsHttpToolsProtocol"
# After an error answer, how long the rest of what the client sends is read and
# dropped before closing: closing with unread bytes sends a TCP reset, and the
# client's kernel may then discard our answer before the client reads it.
LINGER_SECONDS = 1.0


@cache
def _limits() -> tuple[int, float, int]:
    # Read once per process: the class is built by uvicorn for every connection.
    settings = Settings()
    return settings.max_header_bytes, settings.header_timeout, settings.max_connections


def uvicorn_options() -> dict[str, Any]:
    """The uvicorn.run() keywords every taskman API runs with."""
    return {
        "http": PROTOCOL,  # JSON errors, a bounded head
        # X-Forwarded-For is believed only from TASKMAN_TRUSTED_PROXIES (phase 3),
        # not from anyone on 127.0.0.1 as uvicorn would by default.
        "proxy_headers": False,
        # Not uvicorn's limit_concurrency: its 503 is plain text, and it counts only
        # once a head is complete, so it bounds neither slow heads nor their memory;
        # the protocol's own TASKMAN_MAX_CONNECTIONS does both.
    }


def uvicorn_argv(options: dict[str, Any]) -> list[str]:
    """The same options as ``python -m uvicorn`` flags."""
    argv = ["--http", options["http"]]
    if not options["proxy_headers"]:
        argv.append("--no-proxy-headers")
    return argv


class JSONErrorsHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes, self.head_timeout, self.max_connections = _limits()
        # The head being read: True until its headers are complete. The bytes
        # received since it began (an upper bound: a chunk may hold body too) bound
        # what httptools buffers; the sum of its parts is the exact check.
        self.in_head = True
        self.head_received = 0
        self.head_size = 0
        self.head_timer: asyncio.TimerHandle | None = None
        self.refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            # Each open connection may hold a head of up to max_head_bytes: this
            # bounds the memory that slow clients can pin.
            self._send_error(503, "too many connections, try again later")
            return
        self._arm_head_timer()  # a client that never sends a byte is cut too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.in_head:
            self._arm_head_timer()
        self.head_received += len(data)
        super().data_received(data)
        too_large = self.head_received > self.max_head_bytes
        if self.in_head and too_large and not self.refused:
            self._refuse_head_too_large()

    def on_url(self, url: bytes) -> None:
        self.head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._disarm_head_timer()
        if self.head_size > self.max_head_bytes:
            self._refuse_head_too_large()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        super().on_message_complete()
        # The next head starts counting (and its timer) with its first byte.
        self.in_head = True
        self.head_received = 0
        self.head_size = 0

    def _arm_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _disarm_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_late(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        answering = self.cycle is not None and not self.cycle.response_complete
        if self.head_received and not answering:
            detail = f"the request head took over {self.head_timeout:g} s to arrive"
            self._send_error(408, detail)
        else:
            self.transport.close()

    def _refuse_head_too_large(self) -> None:
        detail = f"the request headers are over {self.max_head_bytes} bytes"
        self._send_error(431, detail)

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, msg)

    def _send_error(self, status: int, detail: str) -> None:
        """Answer ``status`` with a JSON ``detail`` and close: the rest of what the
        client sends is not read."""
        self.refused = True
        self._disarm_head_timer()
        body = json.dumps({"detail": detail}).encode()
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()
