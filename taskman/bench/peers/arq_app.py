"""FastAPI + arq, as arq's docs show it: a pool made in the lifespan,
``enqueue_job`` from an async route, ``arq WorkerSettings`` to run it."""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from fastapi import FastAPI, Request

from taskman.baseline import Body


async def echo(ctx: dict[str, Any], value: Any) -> Any:
    return value


def _settings() -> RedisSettings:
    return RedisSettings.from_dsn(os.environ.get("TASKMAN_REDIS_URL", "redis://"))


class WorkerSettings:
    functions = [echo]  # noqa: RUF012 (arq reads class attributes)
    redis_settings = _settings()


def create_app() -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await create_pool(_settings())
        yield
        await app.state.pool.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/tasks", status_code=202)
    async def create_task(body: Body, request: Request) -> dict[str, str]:
        job = await request.app.state.pool.enqueue_job("echo", **body.payload)
        return {"id": job.job_id, "status": "queued"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def fill(count: int) -> None:
    async def main() -> None:
        pool = await create_pool(_settings())
        for _ in range(count):
            await pool.enqueue_job("echo", value=1)
        await pool.aclose()

    asyncio.run(main())
