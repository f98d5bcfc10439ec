"""Every error is JSON with a ``detail``: no HTML page, no bare 500."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from common.backend import BackendError

log = logging.getLogger("taskman")


async def _backend_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, BackendError)
    return JSONResponse(
        {"detail": str(error) or type(error).__name__},
        status_code=error.status_code,
        headers=error.headers,
    )


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

    Starlette's RequestBodyLimitMiddleware counts streamed (chunked) bodies; a body
    whose Content-Length is already too large is refused here before it is read.
    """

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = RequestBodyLimitMiddleware(app, max_body_size=max_body_size)
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and _too_long(value, self.max_body_size):
                    detail = f"request body is over {self.max_body_size} bytes"
                    response = JSONResponse({"detail": detail}, status_code=413)
                    return await response(scope, receive, send)
        await self.app(scope, receive, send)


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
