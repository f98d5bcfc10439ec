"""The HTTP API of docs/contract.md, written once for every phase.

Routes reach the phase's backend through ``app.state.backend``; a phase's
``app.py`` hands :func:`create_api` a factory of its backend, and that is all.
"""

import gc
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from common.backend import BackendUnavailable, TaskBackend
from common.errors import install_error_handling
from common.models import Task, TaskCreate
from common.settings import Settings

# Ids are opaque to clients, but we know ours: anything else is not found, without
# asking the backend.
TASK_ID = re.compile(r"[0-9a-f]{32}")

router = APIRouter()


# Two things every route needs are read from the request by plain functions, not
# declared as FastAPI dependencies and Header() parameters. Those are the idiomatic
# way, and they cost ~20 µs of CPU on every request (FastAPI solves dependencies
# with pydantic, per request): on the POST that is a tenth of the whole. The
# Idempotency-Key still appears in the OpenAPI schema, declared by hand.


def backend_of(request: Request) -> TaskBackend:
    """The phase's backend, which its lifespan put in ``app.state``."""
    backend: TaskBackend = request.app.state.backend
    return backend


IDEMPOTENCY_KEY_LENGTH = 128
# Printable ASCII: HTTP headers arrive as Latin-1, anything else is garbled.
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]+")
IDEMPOTENCY_KEY_SCHEMA = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Send the same key again to get the first task back, not a new one.",
    "schema": {
        "type": "string",
        "maxLength": IDEMPOTENCY_KEY_LENGTH,
        "pattern": f"^{IDEMPOTENCY_KEY.pattern}$",
    },
}


def idempotency_key(request: Request) -> str | None:
    """The Idempotency-Key header, refused with the 422 FastAPI would give."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if len(key) > IDEMPOTENCY_KEY_LENGTH:
        problem = (
            "string_too_long",
            f"String should have at most {IDEMPOTENCY_KEY_LENGTH} characters",
        )
    elif not IDEMPOTENCY_KEY.fullmatch(key):
        problem = ("string_pattern_mismatch", "String should be printable ASCII")
    else:
        return key
    kind, message = problem
    where = ("header", "idempotency-key")
    raise RequestValidationError([{"type": kind, "loc": where, "msg": message}])


NOT_FOUND = "task not found"


def task_response(
    task: Task, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """The task as JSON. Returning a Response skips FastAPI's second validation of
    a Task that our own code has just built: measurably more requests per second."""
    return Response(
        task.model_dump_json(), status_code, headers, media_type="application/json"
    )


@router.post(
    "/tasks",
    status_code=202,
    response_model=Task,
    responses={200: {"model": Task, "description": "an idempotent repeat"}},
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_SCHEMA]},
)
async def create_task(body: TaskCreate, request: Request) -> Response:
    """Queue a task; answers at once, before it runs."""
    key = idempotency_key(request)
    task, created = await backend_of(request).submit(body, key)
    location = {"Location": f"/tasks/{task.id}"}
    return task_response(task, 202 if created else 200, location)


@router.get("/tasks/{task_id}", response_model=Task)
async def read_task(task_id: str, request: Request) -> Response:
    """A task's status, and its result once finished."""
    task = (
        await backend_of(request).get(task_id) if TASK_ID.fullmatch(task_id) else None
    )
    if task is None:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return task_response(task)


@router.delete("/tasks/{task_id}", response_model=Task)
async def cancel_task(task_id: str, request: Request) -> Response:
    """Cancel a queued, retrying or running task."""
    task = (
        await backend_of(request).cancel(task_id)
        if TASK_ID.fullmatch(task_id)
        else None
    )
    if task is None:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return task_response(task)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Is the service, and what it depends on, answering?"""
    phase = request.app.state.phase
    try:
        facts = await backend_of(request).health()
    except BackendUnavailable as error:
        body: dict[str, Any] = {
            "status": "degraded",
            "phase": phase,
            "detail": str(error),
        }
        return JSONResponse(body, status_code=503, headers=error.headers)
    return JSONResponse({"status": "ok", "phase": phase, **facts})


BackendFactory = Callable[[Settings], TaskBackend]


def create_api(phase: int, settings: Settings, backend: BackendFactory) -> FastAPI:
    """The FastAPI app every phase serves. Its lifespan builds the phase's backend
    (in the running event loop, which a backend may need) and closes it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.backend = backend(settings)
        # What exists now (modules, routes, models, clients) lives as long as
        # the process. Frozen, Python's full collections stop re-scanning it:
        # without this they cost phase 2 ~12 % of its CPU per POST.
        gc.freeze()
        try:
            yield
        finally:
            await app.state.backend.aclose()

    app = FastAPI(
        title=f"taskman, phase {phase}",
        summary="An asynchronous task manager: POST a task, poll for its result.",
        lifespan=lifespan,
    )
    app.state.phase = phase
    app.state.settings = settings
    install_error_handling(app, settings.max_body_bytes)
    app.include_router(router)
    return app
