"""The HTTP API of CONTRACT.md, written once for every phase.

Routes reach the phase's backend through ``app.state.backend``; building the app
with :func:`create_api` is the only thing a phase's ``app.py`` must do.
"""

import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Request,
    Response,
)
from fastapi.responses import JSONResponse

from common.backend import BackendUnavailable, TaskBackend
from common.errors import install_error_handling
from common.models import Task, TaskCreate
from common.settings import Settings

# Ids are opaque to clients, but we know ours: anything else is not found, without
# asking the backend.
TASK_ID = re.compile(r"[0-9a-f]{32}")

router = APIRouter()


async def get_backend(request: Request) -> TaskBackend:
    # async on purpose: FastAPI runs a plain def dependency in a thread pool, a
    # thread hop on every request for what is a dictionary lookup.
    backend: TaskBackend = request.app.state.backend
    return backend


Backend = Annotated[TaskBackend, Depends(get_backend)]


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
)
async def create_task(
    body: TaskCreate,
    backend: Backend,
    # Printable ASCII: HTTP headers arrive as Latin-1, anything else is garbled.
    idempotency_key: Annotated[
        str | None, Header(max_length=128, pattern=r"^[\x20-\x7e]+$")
    ] = None,
) -> Response:
    """Queue a task; answers at once, before it runs."""
    task, created = await backend.submit(body, idempotency_key)
    location = {"Location": f"/tasks/{task.id}"}
    return task_response(task, 202 if created else 200, location)


@router.get("/tasks/{task_id}", response_model=Task)
async def read_task(task_id: str, backend: Backend) -> Response:
    """A task's status, and its result once finished."""
    task = await backend.get(task_id) if TASK_ID.fullmatch(task_id) else None
    if task is None:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return task_response(task)


@router.delete("/tasks/{task_id}", response_model=Task)
async def cancel_task(task_id: str, backend: Backend) -> Response:
    """Cancel a queued, retrying or running task."""
    task = await backend.cancel(task_id) if TASK_ID.fullmatch(task_id) else None
    if task is None:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return task_response(task)


@router.get("/health")
async def health(request: Request, backend: Backend) -> JSONResponse:
    """Is the service, and what it depends on, answering?"""
    phase = request.app.state.phase
    try:
        facts = await backend.health()
    except BackendUnavailable as error:
        body: dict[str, Any] = {
            "status": "degraded",
            "phase": phase,
            "detail": str(error),
        }
        return JSONResponse(body, status_code=503, headers=error.headers)
    return JSONResponse({"status": "ok", "phase": phase, **facts})


Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_api(phase: int, settings: Settings, lifespan: Lifespan) -> FastAPI:
    """The FastAPI app every phase serves; the lifespan sets ``app.state.backend``."""
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
