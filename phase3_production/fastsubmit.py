"""Engine room: ``POST /tasks`` answered in front of FastAPI, when nothing is wrong.

A body declared within the limit, sent as ``application/json``, that parses and
validates as a TaskCreate (with a valid Idempotency-Key, if any), is submitted
here and answered with what common/api.py's ``create_task`` answers (the same
function builds the response), without FastAPI's routing, its dependency solving,
its request object and the exception and exit-stack layers around the route.
Anything else (a bad body or key, another content type, a chunked or oversized
body, a disconnect) goes to the app untouched, the body replayed message by
message as it came, so every 4xx (413, 422: tests/test_bad_input.py) is still
FastAPI's own; such a request is parsed twice, a price only a refused one pays.
The rate limit and the metrics still see the request: they run before this.

Gain, measured 2026-12-03 A B A B on a loaded 2-core machine (ratios are the
figure): CPU per POST of the API process (utime+stime from /proc, wrk -t1 -c32
-d3s, five rounds, the same Redis), phase 3 without it 688-901 µs, with it
457-625, taskman/baseline.py's bare POST 294-378: 0.67 of the bare app's
efficiency instead of 0.45 (per round median). In-process (ASGI calls, 32 at
once, process_time): 306-358 µs per POST against 500-650 without it.
Coupling: it answers for the route ``POST /tasks`` of common/api.py; the route's
own parts (``submitted``, ``valid_idempotency_key``, the backend's error answer)
are the ones called here. tests/test_engine_room.py holds its answers to the
app's, byte for byte.
"""

import json
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.api import submitted, valid_idempotency_key
from common.backend import BackendError, TaskBackend
from common.errors import backend_error_response
from common.models import TaskCreate
from phase3_production.metrics import ROUTE_TEMPLATE

TEMPLATE = "/tasks"  # common/api.py's create_task, for the metrics
JSON = b"application/json"


class FastSubmit:
    """Pure ASGI: ``app.add_middleware(FastSubmit, max_body_bytes=...)``."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != "/tasks"
            or scope["query_string"]
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        plain, key = self._inspect(scope["headers"])
        if not plain:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # a disconnect: the app's to see
                return await self.app(scope, _replay(messages, receive), send)
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        request = _valid(body, key)
        if request is None:  # the app answers it, with FastAPI's own 4xx
            return await self.app(scope, _replay(messages, receive), send)
        backend: TaskBackend = scope["app"].state.backend
        scope[ROUTE_TEMPLATE] = TEMPLATE
        try:
            task, created = await backend.submit(request, key)
        except BackendError as error:
            await backend_error_response(error)(scope, receive, send)
            return
        await submitted(task, created)(scope, receive, send)

    def _inspect(
        self, headers: Sequence[tuple[bytes, bytes]]
    ) -> tuple[bool, str | None]:
        """Whether the body is JSON, declared within the limit; the
        Idempotency-Key, if any (the first of each header, as Starlette reads)."""
        content_type = length = key = None
        for name, value in headers:
            if name == b"content-type":
                content_type = content_type or value
            elif name == b"content-length":
                length = length or value
            elif name == b"transfer-encoding":
                return False, None
            elif name == b"idempotency-key" and key is None:
                key = value.decode("latin-1")
        if content_type != JSON or length is None or not length.isdigit():
            return False, None
        return int(length) <= self.max_body_bytes, key


def _valid(body: bytes, key: str | None) -> TaskCreate | None:
    """The request, if FastAPI would hand it to the route; else None."""
    try:
        data: Any = json.loads(body)
        request = TaskCreate.model_validate(data)
        valid_idempotency_key(key)
    except Exception:  # the app decides what it is (e.g. a
        # RecursionError from JSON nested too deep, which it answers as a 4xx)
        return None
    return request


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` as it was: the messages read already, then the rest."""

    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()

    return replayed
