"""FastAPI + saq, as saq's README shows it: ``queue.enqueue`` from an async route,
``saq settings`` to run it (saq's default concurrency, 10)."""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from saq import Queue

from taskman.baseline import Body

queue = Queue.from_url(os.environ.get("TASKMAN_REDIS_URL", "redis://"))


async def echo(ctx: dict[str, Any], *, value: Any) -> Any:
    return value


settings = {"queue": queue, "functions": [echo], "concurrency": 10}


def create_app() -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await queue.connect()
        yield
        await queue.disconnect()

    app = FastAPI(lifespan=lifespan)

    @app.post("/tasks", status_code=202)
    async def create_task(body: Body) -> dict[str, str]:
        job = await queue.enqueue("echo", **body.payload)
        return {"id": job.key if job else "", "status": "queued"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def fill(count: int) -> None:
    async def main() -> None:
        await queue.connect()
        for _ in range(count):
            await queue.enqueue("echo", value=1)
        await queue.disconnect()

    asyncio.run(main())
