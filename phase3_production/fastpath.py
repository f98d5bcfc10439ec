"""Engine room: ``GET /tasks/{id}`` answered in front of FastAPI.

The API's hottest request, a poll of one task, is answered here in pure ASGI with
the same status, body and headers the app would send (ETag, ``X-Cache``, ``304`` for
a matching If-None-Match, exactly as http_cache.py decides it), without FastAPI's
routing, its request and response objects or its dependency solving:
- a finished task this process holds a fresh copy of (cache.py's in-process layer,
  trusted at most a second) goes out as the copy's prebuilt bytes, no await at all;
- any other task is read from the backend (the cache first, as the route reads it).
Anything it is not sure of goes to the app untouched: a query string (``?wait``),
another method or path, an id that is not ours, a task that is not there (404), an
error of the backend (the app reads again and answers it its own way). The rate
limit and the metrics still see every request: they run before this.

Gain: FastAPI's part of the request, about three quarters of the API process's CPU
for a cached GET and a third for an unfinished one (profiles in docs/phase3.md,
"where a GET's time goes").
Coupling: it answers for common/api.py's ``read_task`` and http_cache.py, so it
must send what they would; tests/test_cache.py holds its answers to the app's,
byte for byte.
"""

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from common.backend import TaskBackend
from phase3_production.cache import Copy, LocalCopies, cache_outcome
from phase3_production.http_cache import entity_tag, none_match
from phase3_production.metrics import ROUTE_TEMPLATE, Metrics

TASK = re.compile(r"/tasks/([0-9a-f]{32})")
TEMPLATE = "/tasks/{task_id}"  # common/api.py's read_task, for the metrics


class FastPath:
    """Pure ASGI: ``app.add_middleware(FastPath, copies=..., metrics=...)``."""

    def __init__(self, app: ASGIApp, copies: LocalCopies, metrics: Metrics) -> None:
        self.app = app
        self.copies = copies
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "GET"
            or scope["query_string"]
            or (match := TASK.fullmatch(scope["path"])) is None
        ):
            await self.app(scope, receive, send)
            return
        copy = self.copies.fresh(match[1])
        if copy is not None:
            self.metrics.count_cache(hit=True)
            if not copy.etag:
                copy.etag = entity_tag(copy.body)
            outcome = b"HIT"
        else:
            backend: TaskBackend = scope["app"].state.backend
            cache_outcome.set(None)
            try:
                task = await backend.get(match[1])
            except Exception:
                task = None  # the app reads again, and answers the error its way
            if task is None:
                await self.app(scope, receive, send)
                return
            body = task.model_dump_json().encode()  # as common.api answers it
            copy = Copy(0.0, task, body, entity_tag(body))
            outcome = (cache_outcome.get() or "MISS").encode()
        scope[ROUTE_TEMPLATE] = TEMPLATE
        await self._answer(scope, send, copy, outcome)

    async def _answer(
        self, scope: Scope, send: Send, copy: Copy, outcome: bytes
    ) -> None:
        etag = copy.etag.encode()
        if_none_match = [
            value.decode("latin-1")
            for name, value in scope["headers"]
            if name == b"if-none-match"
        ]
        if if_none_match and none_match(if_none_match, copy.etag):
            headers = [(b"etag", etag), (b"x-cache", outcome)]
            await send(
                {"type": "http.response.start", "status": 304, "headers": headers}
            )
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [
            (b"content-length", str(len(copy.body)).encode()),
            (b"content-type", b"application/json"),
            (b"etag", etag),
            (b"x-cache", outcome),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": copy.body})
