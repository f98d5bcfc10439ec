"""Waiting for a task without polling: ``GET /tasks/{id}?wait=S`` and the event
stream of ``GET /tasks/{id}/events``, both written once over the backend's
:meth:`~common.backend.TaskBackend.wait`, which each phase implements on what its
runners signal (phase 1: an asyncio event; phases 2 and 3: RQ's results stream).
"""

import json
from collections.abc import AsyncIterator

import anyio
from fastapi.responses import StreamingResponse

from common.backend import BackendError, TaskBackend
from common.models import Task

# A comment line this often keeps proxies (and clients) from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0


async def wait_until_finished(
    backend: TaskBackend, task: Task, seconds: float
) -> Task | None:
    """The task once finished, or as it is after ``seconds``; None if it went
    (expired, or deleted behind the API's back) meanwhile."""
    deadline = anyio.current_time() + seconds
    while not task.status.finished:
        left = deadline - anyio.current_time()
        if left <= 0:
            break
        newer = await backend.wait(task.id, left, seen=task)
        if newer is None:
            return None
        task = newer
    return task


def event_stream(backend: TaskBackend, task: Task) -> StreamingResponse:
    """Server-Sent Events: the task now, then once per change, until it finishes."""
    return StreamingResponse(
        _events(backend, task),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _event(number: int, task: Task) -> str:
    return f"id: {number}\nevent: task\ndata: {task.model_dump_json()}\n\n"


async def _events(backend: TaskBackend, task: Task) -> AsyncIterator[str]:
    number = 1
    yield _event(number, task)
    while not task.status.finished:
        try:
            newer = await backend.wait(task.id, KEEPALIVE_SECONDS, seen=task)
        except BackendError as error:  # Redis away: say so, and end the stream
            detail = json.dumps({"detail": str(error)})
            yield f"event: error\ndata: {detail}\n\n"
            return
        if newer is None:
            yield 'event: gone\ndata: {"detail": "task not found"}\n\n'
            return
        if newer == task:
            yield ": keepalive\n\n"
            continue
        task = newer
        number += 1
        yield _event(number, task)
