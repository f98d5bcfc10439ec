"""FastAPI + taskiq on a Redis stream, as taskiq-redis's README shows it:
``echo.kiq()`` from an async route, ``taskiq worker --workers 1`` to run it."""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from taskman.baseline import Body

_URL = os.environ.get("TASKMAN_REDIS_URL", "redis://")
broker = RedisStreamBroker(_URL).with_result_backend(RedisAsyncResultBackend(_URL))


@broker.task
async def echo(value: Any) -> Any:
    return value


def create_app() -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.startup()
        yield
        await broker.shutdown()

    app = FastAPI(lifespan=lifespan)

    @app.post("/tasks", status_code=202)
    async def create_task(body: Body) -> dict[str, str]:
        task = await echo.kiq(**body.payload)
        return {"id": task.task_id, "status": "queued"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def fill(count: int) -> None:
    async def main() -> None:
        await broker.startup()
        for _ in range(count):
            await echo.kiq(value=1)
        await broker.shutdown()

    asyncio.run(main())
