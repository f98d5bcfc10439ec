"""One suite for every phase: the ``phase`` fixture runs each contract test once per
phase package. Adding a phase is adding one entry to PHASES."""

import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient

from common.settings import Settings
from taskman.redis_server import EmbeddedRedis

PHASES = [
    pytest.param("phase1_inprocess", id="phase1"),
    pytest.param("phase2_queue", id="phase2"),
    pytest.param("phase3_production", id="phase3"),
]

# How many long tasks it takes to keep every runner of a phase busy (phase 1: its
# I/O consumers, set small below; later phases: their worker processes).
CAPACITY = 2

FINISHED = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of the suite's own, on a free port (never the machine's);
    TASKMAN_TEST_REDIS_URL names another to use instead."""
    given = os.environ.get("TASKMAN_TEST_REDIS_URL")
    if given:
        yield given
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own: nothing else sends it commands, and the test
    may kill it."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop(kill=True)


# Each queued phase has its own queue and its own workers: phase 3's tests run on
# phase 3's worker (the engine room's), phase 2's on plain RQ's.
QUEUES = {"phase2_queue": "taskman", "phase3_production": "taskman3"}


def _start_workers(redis_url: str, phase: str) -> list[subprocess.Popen[bytes]]:
    """CAPACITY real ``taskman worker`` processes of a phase, on the suite's Redis."""
    env = {
        **os.environ,
        "TASKMAN_REDIS_URL": redis_url,
        "TASKMAN_QUEUE_NAME": QUEUES[phase],
    }
    number = phase.removeprefix("phase")[0]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "taskman", "worker", "--phase", number],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(CAPACITY)
    ]


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.kill()
        worker.wait()


@pytest.fixture(scope="session")
def rq_workers(redis_url: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Phase 2's workers, on the default queue."""
    workers = _start_workers(redis_url, "phase2_queue")
    yield workers
    _stop_workers(workers)


@pytest.fixture(scope="session")
def rq_workers_phase3(redis_url: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Phase 3's workers, on a queue of their own."""
    workers = _start_workers(redis_url, "phase3_production")
    yield workers
    _stop_workers(workers)


@pytest.fixture(params=PHASES)
def phase(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "phase2_queue":
        request.getfixturevalue("rq_workers")
    elif request.param == "phase3_production":
        request.getfixturevalue("rq_workers_phase3")
    return importlib.import_module(request.param)


@pytest.fixture
def settings(phase: ModuleType, request: pytest.FixtureRequest) -> Settings:
    """Test settings: retries at once (rq schedules delayed retries, a burst skips
    them), a small phase-1 I/O lane so a test can fill it."""
    values: dict[str, Any] = {
        "retry_backoff": [0],
        "retry_jitter": 0,
        "io_concurrency": CAPACITY,
        "cpu_workers": 1,
        "shutdown_timeout": 1,
    }
    if phase.__name__ != "phase1_inprocess":
        values["redis_url"] = request.getfixturevalue("redis_url")
        values["queue_name"] = QUEUES[phase.__name__]
    if phase.__name__ == "phase3_production":
        # The contract tests are not about limits: keep them out of the way.
        values["rate_limit_submit"] = values["rate_limit_read"] = "100000/second"
    return Settings(**values)


@pytest.fixture
def client(phase: ModuleType, settings: Settings) -> Iterator[TestClient]:
    with TestClient(phase.create_app(settings)) as test_client:
        yield test_client


def submit(client: TestClient, type: str, **payload: Any) -> dict[str, Any]:  # noqa: A002
    max_retries = payload.pop("max_retries", None)
    body: dict[str, Any] = {"type": type, "payload": payload}
    if max_retries is not None:
        body["max_retries"] = max_retries
    response = client.post("/tasks", json=body)
    assert response.status_code == 202, response.text
    task: dict[str, Any] = response.json()
    return task


def wait_for(
    client: TestClient, task_id: str, *statuses: str, timeout: float = 20
) -> dict[str, Any]:
    """Poll GET /tasks/{id} until the task is in one of ``statuses`` (default:
    finished); fail with its last state otherwise."""
    wanted = statuses or FINISHED
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        if task["status"] in wanted:
            return task
        if time.monotonic() > deadline:
            pytest.fail(f"task never reached {wanted}: {task}")
        time.sleep(0.02)
