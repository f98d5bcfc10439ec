"""Workers that die are replaced (taskman/supervisor.py), and /health counts only
the live ones, by their heartbeats."""

import importlib
import logging
import random
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from rq.utils import now, utcformat

from common.settings import Settings
from taskman.processes import children, command_line, send
from taskman.redis_server import free_port
from taskman.supervisor import Backoff, Supervisor
from tests.processes import alive, descendants, taskman

FINISHED = ("succeeded", "failed", "canceled")


@pytest.mark.parametrize("module", ["phase2_queue", "phase3_production"])
def test_health_counts_only_workers_whose_heartbeat_is_recent(
    module: str, redis_url: str
) -> None:
    queue = f"health-{uuid4().hex[:8]}"
    connection = redis.Redis.from_url(redis_url)
    fresh, stale, gone, garbled = (f"rq:worker:{queue}-{n}" for n in range(4))
    connection.hset(fresh, "last_heartbeat", utcformat(now()))
    # A SIGKILLed worker: still registered, its hash alive for a minute more.
    connection.hset(stale, "last_heartbeat", utcformat(now() - timedelta(seconds=40)))
    connection.hset(garbled, "last_heartbeat", "not a date")
    connection.sadd(f"rq:workers:{queue}", fresh, stale, gone, garbled)
    settings = Settings(redis_url=redis_url, queue_name=queue)
    app = importlib.import_module(module).create_app(settings)
    with TestClient(app) as client:
        health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["workers"] == 1


def test_a_worker_that_keeps_dying_is_restarted_later_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="taskman")
    dies = [sys.executable, "-c", "raise SystemExit(3)"]
    backoff = Backoff(first=0.1, most=0.4, stable=60)
    with Supervisor(dies, 1, backoff=backoff, poll=0.01):
        deadline = time.monotonic() + 20
        while len(_restarts(caplog)) < 5:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
    delays = _restarts(caplog)[:5]
    assert delays == ["0.1", "0.2", "0.4", "0.4", "0.4"]
    assert "worker 1 exited with code 3" in caplog.text


def _restarts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage().rsplit("restarting in ", 1)[1].removesuffix(" s")
        for record in caplog.records
        if "restarting in" in record.getMessage()
    ]


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    stubborn = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "time.sleep(60)",
    ]
    supervisor = Supervisor(stubborn, 2, grace=0.5)
    with supervisor:
        deadline = time.monotonic() + 10
        while len(pids := supervisor.pids()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert supervisor.pids() == []
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)


def test_worker_concurrency_replaces_a_killed_worker_and_stops_them_all_on_sigterm(
    redis_url: str, tmp_path: Path
) -> None:
    env = {"TASKMAN_REDIS_URL": redis_url, "TASKMAN_QUEUE_NAME": uuid4().hex}
    parent = taskman(
        "worker", "--phase", "2", "--concurrency", "2", env=env, log=tmp_path / "log"
    )
    try:
        first = _wait_for_workers(parent.pid, 2)
        send(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while first[0] in (now_running := _wait_for_workers(parent.pid, 2)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        below = descendants(parent.pid)
    finally:
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(timeout=30)
    assert code == 0
    assert first[1] in now_running
    assert [pid for pid in below if alive(pid)] == [], "a worker outlived its parent"


def _wait_for_workers(parent_pid: int, count: int) -> list[int]:
    deadline = time.monotonic() + 20
    while len(pids := _worker_pids(parent_pid)) != count:
        assert time.monotonic() < deadline, pids
        time.sleep(0.1)
    return pids


@pytest.mark.parametrize("phase", [2, 3])
def test_serve_replaces_killed_workers_and_loses_no_task(
    phase: int, redis_url: str, tmp_path: Path
) -> None:
    tasks, kills, workers = 300, 4, 3
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "TASKMAN_REDIS_URL": redis_url,
        "TASKMAN_QUEUE_NAME": f"supervise-{uuid4().hex[:8]}",
        "TASKMAN_RETRY_BACKOFF": "0",
        "TASKMAN_JOB_HEARTBEAT_SECONDS": "2",
        "TASKMAN_RATE_LIMIT_SUBMIT": "100000/second",
        "TASKMAN_RATE_LIMIT_READ": "100000/second",
    }
    log = tmp_path / "serve.log"
    server = taskman(
        "serve",
        "--phase",
        str(phase),
        "--port",
        str(port),
        "--workers",
        str(workers),
        env=env,
        log=log,
    )
    killed: list[int] = []
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            _wait_for_live_workers(client, workers, server.pid)
            rng = random.Random(phase)
            ids = []
            every = tasks // (kills + 1)  # the kills spread over the submissions
            for n in range(tasks):
                ids.append(_submit(client, rng))
                if n % every == every - 1 and len(killed) < kills:
                    killed.append(_kill_a_worker(server.pid))
                    time.sleep(0.5)  # let the replacement's backoff run
            statuses = _wait_until_finished(client, ids)
            assert statuses.get("succeeded", 0) >= tasks - kills, statuses
            assert set(statuses) <= {"succeeded", "failed"}, statuses
            _wait_for_live_workers(client, workers, server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert len(killed) == kills
    assert log.read_text().count("exited with SIGKILL") == kills


def _submit(client: httpx.Client, rng: random.Random) -> str:
    body: dict[str, Any] = rng.choice(
        [
            {"type": "echo", "payload": {"value": 1}},
            {"type": "sleep", "payload": {"seconds": 0.1}},
            {"type": "flaky", "payload": {"fail_times": 1}},
        ]
    )
    answer = client.post("/tasks", json=body)
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["id"]
    return task_id


def _worker_pids(server_pid: int) -> list[int]:
    return [
        pid for pid in children(server_pid) if " worker --phase" in command_line(pid)
    ]


def _kill_a_worker(server_pid: int) -> int:
    deadline = time.monotonic() + 30
    while not (pids := _worker_pids(server_pid)):
        assert time.monotonic() < deadline, "no worker left to kill"
        time.sleep(0.1)
    victim = random.choice(pids)
    send(victim, signal.SIGKILL)
    return victim


def _wait_until_finished(client: httpx.Client, ids: list[str]) -> dict[str, int]:
    """Every task's final status, counted; fails on one stuck for 60 s."""
    deadline = time.monotonic() + 60
    final: dict[str, str] = {}
    last: dict[str, Any] = {}
    while len(final) < len(ids):
        for task_id in ids:
            if task_id not in final:
                last[task_id] = client.get(f"/tasks/{task_id}").json()
                if last[task_id]["status"] in FINISHED:
                    final[task_id] = last[task_id]["status"]
        stuck = [last[i] for i in ids if i not in final]
        # Shown with a failure: what each stuck task was doing.
        assert time.monotonic() < deadline, f"{len(stuck)} of {len(ids)} stuck: {stuck}"
        time.sleep(0.2)
    counts: dict[str, int] = {}
    for status in final.values():
        counts[status] = counts.get(status, 0) + 1
    return counts


def _wait_for_live_workers(client: httpx.Client, count: int, server_pid: int) -> None:
    """Until /health counts ``count`` workers and ``count`` are running."""
    deadline = time.monotonic() + 60
    while True:
        try:
            health = client.get("/health").json()
        except httpx.TransportError:
            health = {}
        running = len(_worker_pids(server_pid))
        if health.get("workers") == count and running == count:
            return
        assert time.monotonic() < deadline, (health, running)
        time.sleep(0.2)
