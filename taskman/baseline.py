"""The bare FastAPI app every figure of the bench is divided by: same uvicorn, same
body model, no queue behind it."""

import uuid
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


class Body(BaseModel):
    type: str
    payload: dict[str, Any]


TASK = {
    "id": "0" * 32,
    "type": "echo",
    "status": "succeeded",
    "payload": {"value": 1},
    "result": 1,
    "error": None,
    "attempts": 1,
    "max_retries": 3,
    "created_at": "2026-01-01T00:00:00Z",
    "started_at": "2026-01-01T00:00:00Z",
    "finished_at": "2026-01-01T00:00:00Z",
}


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/tasks", status_code=202)
    async def create_task(body: Body) -> dict[str, Any]:
        return {**TASK, "id": uuid.uuid4().hex, "status": "queued"}

    @app.get("/tasks/{task_id}")
    async def read_task(task_id: str) -> dict[str, Any]:
        return TASK

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
