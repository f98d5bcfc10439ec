"""Phase 3: the HTTP side of the result cache: ``X-Cache``, ``ETag`` and ``304``.

A polling client that sends back the ETag it got answers itself "nothing changed"
with a 304 and no body. Pure ASGI: it buffers only ``GET /tasks/{id}`` (with or
without ``?wait``) and ``DELETE /tasks/{id}``, a single small task; every other response, the event stream
of ``/tasks/{id}/events`` above all, passes through untouched and unbuffered.
"""

import hashlib
import re

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phase3_production.cache import cache_outcome

# An entity-tag (RFC 9110 §8.8.3): an optional W/ and a quoted opaque tag, which
# may itself hold a comma, so a list is not split on commas.
ENTITY_TAG = re.compile(r'(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")')
# The one route with an ETag, GET and DELETE /tasks/{id}: a task; not the batch
# (a POST), the list, nor the event stream (which must reach the client unbuffered).
TASK_PATH = re.compile(r"/tasks/[^/]+")


def entity_tag(body: bytes) -> str:
    """The ETag of a task's answer: a digest of its body, strong."""
    return f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"'


def none_match(if_none_match: list[str], etag: str) -> bool:
    """Does If-None-Match match ``etag`` (RFC 9110 §13.1.2)? "*" matches any
    representation; each listed tag is compared weakly, its W/ ignored."""
    value = ",".join(if_none_match).strip()
    if value == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(tag == opaque for tag in ENTITY_TAG.findall(value))


class HTTPCache:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("GET", "DELETE")
            or not TASK_PATH.fullmatch(scope["path"])
        ):
            return await self.app(scope, receive, send)
        if_none_match = Headers(scope=scope).getlist("if-none-match")
        start: Message | None = None
        cache_outcome.set(None)

        async def send_with_etag(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message  # wait for the body: the ETag is its digest
                return
            assert start is not None
            if start["status"] != 200 or message.get("more_body"):
                await send(start)
                await send(message)
                return
            body = message.get("body", b"")
            etag = entity_tag(body)
            headers = MutableHeaders(scope=start)
            headers["ETag"] = etag
            if outcome := cache_outcome.get():
                headers["X-Cache"] = outcome
            if scope["method"] == "GET" and none_match(if_none_match, etag):
                del headers["content-length"]
                del headers["content-type"]
                await send({**start, "status": 304})
                await send({"type": "http.response.body", "body": b""})
                return
            await send(start)
            await send(message)

        await self.app(scope, receive, send_with_etag)
