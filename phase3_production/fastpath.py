"""Engine room: a cache hit answered in front of FastAPI.

``GET /tasks/{id}`` of a finished task this process holds a fresh copy of (cache.py's
in-process layer, trusted at most a second) is answered here with the copy's
prebuilt bytes: the same status, body and headers the app would send (ETag,
``X-Cache: HIT``, ``304`` for a matching If-None-Match, exactly as http_cache.py
decides it), without FastAPI's routing, its request and response objects or the
route. The rate limit and the metrics still see the request: they run before this.

Gain: FastAPI's part of a cached GET, about three quarters of the API process's CPU
for it (profile in docs/phase3.md, "where a cached GET's time goes").
Coupling: it answers for the route ``GET /tasks/{task_id}`` of common/api.py, so it
must send what that route, http_cache.py and the error handlers would; anything it
is not sure of (a query string, another method, no fresh copy) goes to the app
untouched. tests/test_engine_room.py holds its answers to the app's, byte for byte.
"""

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from phase3_production.cache import LocalCopies
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
            or (copy := self.copies.fresh(match[1])) is None
        ):
            await self.app(scope, receive, send)
            return
        if not copy.etag:
            copy.etag = entity_tag(copy.body)
        etag = copy.etag.encode()
        scope[ROUTE_TEMPLATE] = TEMPLATE
        self.metrics.count_cache(hit=True)
        if_none_match = [
            value.decode("latin-1")
            for name, value in scope["headers"]
            if name == b"if-none-match"
        ]
        if if_none_match and none_match(if_none_match, copy.etag):
            headers = [(b"etag", etag), (b"x-cache", b"HIT")]
            await send(
                {"type": "http.response.start", "status": 304, "headers": headers}
            )
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [
            (b"content-length", str(len(copy.body)).encode()),
            (b"content-type", b"application/json"),
            (b"etag", etag),
            (b"x-cache", b"HIT"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": copy.body})
