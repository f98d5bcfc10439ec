"""FastAPI + Celery on Redis (broker and result backend), as Celery's first steps
show it: ``echo.delay()`` in a sync route, ``celery worker --pool solo``."""

import os
from typing import Any

from celery import Celery
from fastapi import FastAPI

from taskman.baseline import Body

celery = Celery(
    "peers",
    broker=os.environ.get("TASKMAN_REDIS_URL", "redis://"),
    backend=os.environ.get("TASKMAN_REDIS_URL", "redis://"),
)
celery.conf.broker_connection_retry_on_startup = True


@celery.task
def echo(value: Any) -> Any:
    return value


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/tasks", status_code=202)
    def create_task(body: Body) -> dict[str, str]:
        result = echo.delay(**body.payload)
        return {"id": result.id, "status": "queued"}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def fill(count: int) -> None:
    for _ in range(count):
        echo.delay(value=1)
