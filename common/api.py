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


def get_backend(request: Request) -> TaskBackend:
    backend: TaskBackend = request.app.state.backend
    return backend


Backend = Annotated[TaskBackend, Depends(get_backend)]


def _not_found(task_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail="task not found")


@router.post(
    "/tasks",
    status_code=202,
    responses={200: {"model": Task, "description": "an idempotent repeat"}},
)
async def create_task(
    body: TaskCreate,
    backend: Backend,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> Task:
    """Queue a task; answers at once, before it runs."""
    task, created = await backend.submit(body, idempotency_key)
    response.headers["Location"] = f"/tasks/{task.id}"
    if not created:
        response.status_code = 200
    return task


@router.get("/tasks/{task_id}")
async def read_task(task_id: str, backend: Backend) -> Task:
    """A task's status, and its result once finished."""
    task = await backend.get(task_id) if TASK_ID.fullmatch(task_id) else None
    if task is None:
        raise _not_found(task_id)
    return task


@router.delete("/tasks/{task_id}")
async def cancel_task(task_id: str, backend: Backend) -> Task:
    """Cancel a queued, retrying or running task."""
    task = await backend.cancel(task_id) if TASK_ID.fullmatch(task_id) else None
    if task is None:
        raise _not_found(task_id)
    return task


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
