"""Every error is JSON with a ``detail``: no HTML page, no bare 500."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.backend import BackendError

log = logging.getLogger("taskman")


def backend_error_response(error: BackendError) -> JSONResponse:
    """The answer to a backend's error: its status, its headers, its message."""
    return JSONResponse(
        {"detail": str(error) or type(error).__name__},
        status_code=error.status_code,
        headers=error.headers,
    )


async def _backend_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, BackendError)
    return backend_error_response(error)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    # FastAPI echoes the rejected input back; drop it (it may be 64 KiB of junk)
    # and keep what and where.
    detail = [
        {"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")}
        for e in error.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # The client learns nothing of our internals; the log keeps the traceback.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


class BodyLimit:
    """413 as JSON for bodies over the limit, declared or streamed.

    A declared body (Content-Length) too large is refused before it is read; one
    within the limit passes untouched, since the server delivers no more than it
    declared. Only a streamed (chunked) body is counted as it arrives; a request
    with neither header has no body. Starlette's
    RequestBodyLimitMiddleware counts every body, at a cost on every request, and
    answers in plain text when the route never reads the body.
    """

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if _too_long(value, self.max_body_size):
                    response = JSONResponse({"detail": self._detail}, status_code=413)
                    return await response(scope, receive, send)
                break
            if name == b"transfer-encoding":  # chunked: count it as it comes
                return await self.app(scope, self._counted(receive), send)
        # Declared within the limit, or no body at all (a GET): nothing to count.
        await self.app(scope, receive, send)

    @property
    def _detail(self) -> str:
        return f"request body is over {self.max_body_size} bytes"

    def _counted(self, receive: Receive) -> Receive:
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_size:
                # Raised where the route reads its body: FastAPI lets an
                # HTTPException through, and answers it as JSON.
                raise HTTPException(status_code=413, detail=self._detail)
            return message

        return counted_receive


def _too_long(value: bytes, limit: int) -> bool:
    try:
        return int(value) > limit
    except ValueError:
        return False


def install_error_handling(app: FastAPI, max_body_bytes: int) -> None:
    """JSON handlers for our errors, and the body size limit."""
    app.add_exception_handler(BackendError, _backend_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(BodyLimit, max_body_size=max_body_bytes)
