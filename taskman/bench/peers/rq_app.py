"""FastAPI + stock RQ, as RQ's docs show it: ``queue.enqueue`` in a sync route
(FastAPI runs it in a thread), ``rq worker`` to run it."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from redis import Redis
from rq import Queue

from taskman.baseline import Body


def echo(value: Any) -> Any:
    return value


def _queue() -> Queue:
    return Queue(connection=Redis.from_url(os.environ["TASKMAN_REDIS_URL"]))


def create_app() -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.queue = _queue()
        yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/tasks", status_code=202)
    def create_task(body: Body, request: Request) -> dict[str, str]:
        job = request.app.state.queue.enqueue(echo, **body.payload)
        return {"id": job.id, "status": "queued"}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def fill(count: int) -> None:
    """``count`` echo jobs in the queue, for the worker alone to drain."""
    queue = _queue()
    queue.enqueue_many(
        [Queue.prepare_data(echo, kwargs={"value": 1}) for _ in range(count)]
    )
