"""The HTTP API of docs/contract.md, written once for every phase.

Routes reach the phase's backend through ``app.state.backend``; a phase's
``app.py`` hands :func:`create_api` a factory of its backend, and that is all.
"""

import gc
import math
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from common.backend import BackendUnavailable, TaskBackend
from common.errors import install_error_handling
from common.events import event_stream, wait_until_finished
from common.listing import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    BadCursor,
    TaskQuery,
    decode_cursor,
)
from common.models import BatchCreate, Task, TaskCreate, TaskList, TaskPage, TaskStatus
from common.openapi import (
    CANCEL,
    HEALTH,
    LIST,
    LOCATION,
    READ,
    SUBMIT,
    install_docs,
)
from common.settings import Settings
from common.tasks import TASKS

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
    return valid_idempotency_key(request.headers.get("idempotency-key"))


def valid_idempotency_key(key: str | None) -> str | None:
    """``key``, if a valid Idempotency-Key (or None); else RequestValidationError."""
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


MAX_WAIT = 30.0
WAIT_SCHEMA = {
    "name": "wait",
    "in": "query",
    "required": False,
    "description": "Seconds to wait for the task to finish before answering "
    "(answered at once when it does).",
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT},
}


def wait_seconds(request: Request) -> float | None:
    """The ``wait`` query parameter: 0 < S <= 30, else the 422 FastAPI would give."""
    given = request.query_params.get("wait")
    if given is None:
        return None
    try:
        seconds = float(given)
    except ValueError:
        problem = ("float_parsing", "Input should be a valid number")
    else:
        if not math.isfinite(seconds) or seconds <= 0:
            problem = ("greater_than", "Input should be greater than 0")
        elif seconds > MAX_WAIT:
            problem = (
                "less_than_equal",
                f"Input should be less than or equal to {MAX_WAIT:g}",
            )
        else:
            return seconds
    kind, message = problem
    raise RequestValidationError(
        [{"type": kind, "loc": ("query", "wait"), "msg": message}]
    )


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
    responses={
        202: {"description": "queued (or scheduled)", "headers": LOCATION},
        200: {
            "model": Task,
            "description": "a repeat of an Idempotency-Key: the first task",
            "headers": LOCATION,
        },
        **SUBMIT,
    },
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_SCHEMA]},
)
async def create_task(body: TaskCreate, request: Request) -> Response:
    """Queue a task; answers at once, before it runs."""
    key = idempotency_key(request)
    task, created = await backend_of(request).submit(body, key)
    return submitted(task, created)


def submitted(task: Task, created: bool) -> Response:
    """POST /tasks's answer: 202 for a new task, 200 for a repeated key's first."""
    return task_response(
        task, 202 if created else 200, {"Location": f"/tasks/{task.id}"}
    )


@router.post(
    "/tasks/batch",
    status_code=202,
    response_model=TaskList,
    responses={
        202: {"description": "every task queued (or scheduled), in the order sent"},
        200: {
            "model": TaskList,
            "description": "a repeat of an Idempotency-Key: the first tasks",
        },
        **SUBMIT,
    },
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_SCHEMA]},
)
async def create_tasks(body: BatchCreate, request: Request) -> Response:
    """Queue 1 to 1000 tasks at once: all valid and all queued, or none."""
    key = idempotency_key(request)
    tasks, created = await backend_of(request).submit_many(body.tasks, key)
    return Response(
        TaskList(tasks=tasks).model_dump_json(),
        202 if created else 200,
        media_type="application/json",
    )


@router.get("/tasks", response_model=TaskPage, responses=LIST)
async def list_tasks(
    request: Request,
    status: TaskStatus | None = None,
    type: Annotated[str | None, Query(description=f"one of {', '.join(TASKS)}")] = None,  # noqa: A002
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Tasks, newest first, a page at a time; filter by status and type."""
    if type is not None and type not in TASKS:
        raise RequestValidationError(
            [
                {
                    "type": "unknown_task_type",
                    "loc": ("query", "type"),
                    "msg": f"unknown task type; known types: {', '.join(TASKS)}",
                }
            ]
        )
    try:
        after = decode_cursor(cursor) if cursor is not None else None
    except BadCursor as error:
        raise RequestValidationError(
            [{"type": "invalid_cursor", "loc": ("query", "cursor"), "msg": str(error)}]
        ) from None
    query = TaskQuery(status=status, type=type, limit=limit, after=after)
    page = await backend_of(request).list(query)
    return Response(page.model_dump_json(), media_type="application/json")


@router.get(
    "/tasks/{task_id}",
    response_model=Task,
    responses=READ,
    openapi_extra={"parameters": [WAIT_SCHEMA]},
)
async def read_task(task_id: str, request: Request) -> Response:
    """A task's status, and its result once finished; with ``wait``, as soon as it
    finishes (or after that many seconds, as it is then)."""
    seconds = wait_seconds(request)
    backend = backend_of(request)
    task = await backend.get(task_id) if TASK_ID.fullmatch(task_id) else None
    if task is not None and seconds is not None:
        task = await wait_until_finished(backend, task, seconds)
    if task is None:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return task_response(task)


@router.get(
    "/tasks/{task_id}/events",
    response_class=Response,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-Sent Events: one `task` event (the task as JSON) "
            "now and at each change of status or progress; closed once finished.",
        },
        **READ,
    },
)
async def task_events(task_id: str, request: Request) -> Response:
    """Follow a task as it runs, without polling."""
    backend = backend_of(request)
    task = await backend.get(task_id) if TASK_ID.fullmatch(task_id) else None
    if task is None:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return event_stream(backend, task)


@router.delete("/tasks/{task_id}", response_model=Task, responses=CANCEL)
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


@router.get("/health", responses=HEALTH)
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
        # Our own /docs and /redoc (install_docs): FastAPI's load from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    app.state.phase = phase
    app.state.settings = settings
    install_error_handling(app, settings.max_body_bytes)
    app.include_router(router)
    return app
