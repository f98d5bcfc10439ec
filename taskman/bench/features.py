"""Issue 11's two figures: how soon ``GET /tasks/{id}?wait=`` answers after a
task ends, and how many tasks per second ``POST /tasks/batch`` accepts."""

import time
from datetime import datetime
from typing import Any

import httpx

from taskman.bench.figures import ECHO
from taskman.bench.load import Load, load, percentiles

BATCH_SIZE = 100


def wait_latency(url: str, count: int) -> tuple[float, float]:
    """p50 and p99 ms from an echo's ``finished_at`` (the runner's clock) to the
    waiting client holding its answer (the same machine's clock): what a wait adds
    after the task has ended. One task at a time, submitted then waited on."""
    spans = []
    with httpx.Client(base_url=url, timeout=40) as client:
        for _ in range(count):
            task_id = client.post("/tasks", json=ECHO).json()["id"]
            task = client.get(f"/tasks/{task_id}", params={"wait": 30}).json()
            answered = time.time()
            if task["status"] != "succeeded":
                raise RuntimeError(f"waited task ended {task['status']}: {task}")
            finished = datetime.fromisoformat(task["finished_at"]).timestamp()
            spans.append(max(0.0, answered - finished))
    return percentiles(spans)


def batch_rate(url: str, seconds: float, size: int = BATCH_SIZE) -> dict[str, Any]:
    """``POST /tasks/batch`` of ``size`` echoes under load: tasks accepted per
    second (requests/s times size), API alone."""
    body = {"tasks": [ECHO] * size}
    result: Load = load(f"{url}/tasks/batch", seconds, connections=8, body=body)
    return {
        "size": size,
        "batches_per_s": round(result.rps, 1),
        "tasks_per_s": round(result.rps * size),
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
    }
