"""What the OpenAPI document says beyond the routes' own signatures: each route's
error answers and headers (docs/contract.md, "Errors"), and the docs pages.

``/docs`` (Swagger UI) and ``/redoc`` are served with their scripts from this app,
not from a CDN: the assets come from the fastapi-offline package, so the pages work
on a machine with no network, as a classroom's or a locked-down server's often is.
"""

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

# fastapi-offline's own entry point builds a whole FastAPI app; we only take its
# files (swagger-ui-dist's bundle and CSS, redoc's standalone script).
ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs/assets"
# The pages may load nothing but from this app: ReDoc's sidebar asks a CDN for a
# logo whatever it is told, and Swagger UI would send the schema to an online
# validator if not told otherwise (validatorUrl below). Inline: each page's init.
DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)


class Problem(BaseModel):
    """Every error but a 422: ``{"detail": "what went wrong"}``."""

    detail: str


class InvalidItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Invalid(BaseModel):
    """A 422: ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}, ...]}``."""

    detail: list[InvalidItem]


class Degraded(BaseModel):
    """``GET /health`` when a dependency does not answer."""

    status: str
    phase: int
    detail: str


def header(description: str, type: str = "string") -> dict[str, Any]:  # noqa: A002
    """An OpenAPI header object."""
    return {"description": description, "schema": {"type": type}}


LOCATION = {"Location": header("the task's URL, `/tasks/{id}`")}
RETRY_AFTER = {"Retry-After": header("seconds to wait before trying again", "integer")}


def problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response of :class:`Problem`, with its headers, for ``responses=``."""
    response: dict[str, Any] = {"model": Problem, "description": description}
    if headers:
        response["headers"] = headers
    return response


UNAVAILABLE = problem(
    "the queue is unreachable or refuses writes (phases 2, 3), phase 1's queue is "
    "full or shutting down; nothing was half-written: retry after `Retry-After`",
    RETRY_AFTER,
)
TOO_LARGE = problem("the body is over `TASKMAN_MAX_BODY_BYTES` (65536)")
REUSED_KEY = problem("the `Idempotency-Key` was used with another body")
NOT_FOUND = problem("no such task: an unknown id, or one that has expired")
INVALID = {
    "model": Invalid,
    "description": "the request is invalid: a list of problems, each with where "
    "(`loc`), what (`msg`) and a machine-readable `type`; nothing was queued",
}

# What each route may answer besides its success, by status.
Responses = dict[int | str, dict[str, Any]]
SUBMIT: Responses = {409: REUSED_KEY, 413: TOO_LARGE, 422: INVALID, 503: UNAVAILABLE}
READ: Responses = {404: NOT_FOUND, 422: INVALID, 503: UNAVAILABLE}
LIST: Responses = {422: INVALID, 503: UNAVAILABLE}
CANCEL: Responses = {
    404: NOT_FOUND,
    409: problem(
        "the task is already finished (`succeeded`, `failed`, `canceled`) or "
        "its worker is writing its outcome (`finishing`)"
    ),
    422: INVALID,
    503: UNAVAILABLE,
}
HEALTH: Responses = {
    503: {
        "model": Degraded,
        "description": "the queue (Redis) does not answer (phases 2, 3)",
        "headers": RETRY_AFTER,
    }
}


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` and ReDoc at ``/redoc`` from our own files.

    The app must be made with ``docs_url=None, redoc_url=None``: FastAPI's own
    pages load their scripts from a CDN.
    """
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title}: Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers["Content-Security-Policy"] = DOCS_POLICY
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title}: ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,  # fonts from Google: not offline
        )
        page.headers["Content-Security-Policy"] = DOCS_POLICY
        return page
