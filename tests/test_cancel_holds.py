"""A DELETE answered 200 holds, and a worker woken from a stop reports nothing for
a job that has moved on: real ``taskman serve``, real workers, real signals."""

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis

from common.models import TaskCreate
from common.settings import Settings
from phase2_queue.backend import RQBackend
from taskman.redis_server import EmbeddedRedis, free_port
from tests.processes import stop, taskman, wait_http

TASKS = 400


def _submit_then_cancel(n: int, base: str) -> tuple[str, int, dict[str, Any]]:
    """POST a task, DELETE it 0-20 ms after its 202: (id, code, body). Mostly echo
    (no checkpoint: the race with the worker's success); every fifth a 50 ms sleep,
    which holds a worker so that echoes wait behind it and some DELETEs come in
    time on a machine where a free worker would finish every echo first."""
    body = (
        {"type": "sleep", "payload": {"seconds": 0.05}}
        if n % 5 == 0
        else {"type": "echo", "payload": {"value": 1}}
    )
    with httpx.Client(base_url=base, timeout=30) as client:
        created = client.post("/tasks", json=body)
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]
        time.sleep(random.uniform(0, 0.02))
        answer = client.delete(f"/tasks/{task_id}")
        return task_id, answer.status_code, answer.json()


@pytest.mark.parametrize("phase", ["2", "3"])
def test_a_delete_answered_200_means_the_task_ends_canceled(
    tmp_path: Path, phase: str
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "TASKMAN_DATA_DIR": str(tmp_path / "data"),
        "TASKMAN_REDIS_URL": "",
        "TASKMAN_RATE_LIMIT_SUBMIT": "100000/second",
        "TASKMAN_RATE_LIMIT_READ": "100000/second",
    }
    server = taskman(
        "serve",
        "--phase",
        phase,
        "--port",
        str(port),
        "--workers",
        "2",
        env=env,
        log=tmp_path / "serve.log",
    )
    try:
        wait_http(f"{base}/health", process=server)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(_submit_then_cancel, range(TASKS), [base] * TASKS))
        time.sleep(1.5)
        with httpx.Client(base_url=base, timeout=30) as client:
            final = {i: client.get(f"/tasks/{i}").json() for i, _, _ in answers}
    finally:
        stop(server)
    canceled = [(i, body) for i, code, body in answers if code == 200]
    assert {code for _, code, _ in answers} <= {200, 409}
    assert canceled, "no DELETE came in time: the race was not exercised"
    said = [body["status"] for _, body in canceled if body["status"] != "canceled"]
    assert said == [], "a 200 whose body is not canceled"
    ended = [
        final[i]["status"] for i, _ in canceled if final[i]["status"] != "canceled"
    ]
    assert ended == [], f"{len(ended)} of {len(canceled)} canceled tasks then ran on"
    for task_id, code, body in answers:
        if code == 409:
            assert final[task_id]["status"] == "succeeded", body


def _worker(url: str, phase: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TASKMAN_REDIS_URL": url,
        "TASKMAN_QUEUE_NAME": "stopped",
        "TASKMAN_JOB_HEARTBEAT_SECONDS": "4",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "taskman", "worker", "--phase", phase],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


@pytest.mark.parametrize("phase", ["2", "3"])
def test_a_worker_woken_from_a_stop_reports_nothing_and_registers_again(
    tmp_path: Path, phase: str
) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    workers = [
        _worker(server.url, phase, tmp_path / f"worker{n}.log") for n in range(2)
    ]
    try:
        connection = redis.Redis.from_url(server.url)
        registry = "rq:workers:stopped"
        _wait(lambda: connection.scard(registry) == 2, 20, "two workers")
        backend = RQBackend(Settings(redis_url=server.url, queue_name="stopped"))
        request = TaskCreate(type="sleep", payload={"seconds": 6}, max_retries=2)
        task, _ = anyio.run(backend.submit, request)
        key = f"rq:job:{task.id}"

        def running_on() -> str | None:
            name: Any = connection.hget(key, "worker_name")
            status: Any = connection.hget(key, "status")
            return name.decode() if name and status == b"started" else None

        first = _wait(running_on, 20, "the task never started")
        pid = int(connection.hget(f"rq:worker:{first}", "pid") or 0)
        stopped = next(w for w in workers if w.pid == pid)
        stopped.send_signal(signal.SIGSTOP)
        try:
            # Its job's heartbeat (4 s) lapses; the other worker takes it back
            # and runs it to the end.
            _wait(
                lambda: connection.hget(key, "status") == b"finished",
                30,
                "the other worker never finished the task",
            )
            assert connection.hget(key, "worker_name").decode() != first
            time.sleep(1)
        finally:
            stopped.send_signal(signal.SIGCONT)
        time.sleep(3)  # its sleep is long over: it would report at once
        assert stopped.poll() is None
        results = connection.xrange(f"rq:results:{task.id}")
        successes = [r for _, r in results if r[b"type"] == b"1"]
        assert len(successes) == 1, results
        assert connection.hget(key, "status") == b"finished"
        _wait(
            lambda: f"rq:worker:{first}".encode() in connection.smembers(registry),
            10,
            "the woken worker never registered again",
        )
        assert connection.hget(f"rq:worker:{first}", "birth")
        anyio.run(backend.aclose)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGCONT)
            worker.kill()
            worker.wait()
        server.stop()
