"""End to end: the real ``taskman serve`` process, spoken to over HTTP."""

import re
import signal
import time
from pathlib import Path

import httpx

from taskman.redis_server import free_port
from tests.processes import alive, descendants, taskman, wait_http


def test_taskman_serve_phase1_runs_tasks_and_leaves_no_process(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    server = taskman(
        "serve",
        "--phase",
        "1",
        "--port",
        str(port),
        log=log,
        env={"TASKMAN_SHUTDOWN_TIMEOUT": "1", "TASKMAN_IO_CONCURRENCY": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", process=server)
        with httpx.Client(base_url=base, timeout=10) as client:
            cpu = [
                client.post(
                    "/tasks",
                    json={
                        "type": "hash",
                        "payload": {"data": "x", "iterations": 2_000_000},
                    },
                ).json()["id"]
                for _ in range(3)
            ]
            # The event loop answers while the pool grinds.
            assert client.get("/health").json()["status"] == "ok"
            statuses = [client.get(f"/tasks/{i}").json()["status"] for i in cpu]
            assert statuses.count("succeeded") < 3
            deadline = time.monotonic() + 30
            while client.get(f"/tasks/{cpu[0]}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            client.post("/tasks", json={"type": "sleep", "payload": {"seconds": 30}})
            for i in range(2):
                client.post("/tasks", json={"type": "sleep", "payload": {"seconds": i}})
            children = descendants(server.pid)
            assert children, "the pool's processes should be running"
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught.
    assert code in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "Application shutdown complete" in text
    # At least the two short sleeps waited behind the long one (the I/O lane is 1).
    lost = re.search(r"(\d+) queued task\(s\) are lost", text)
    assert lost and int(lost[1]) >= 2
    time.sleep(0.2)
    assert [pid for pid in children if alive(pid)] == []


def test_taskman_serve_phase2_keeps_tasks_across_a_restart(tmp_path: Path) -> None:
    env = {"TASKMAN_DATA_DIR": str(tmp_path / "data"), "TASKMAN_REDIS_URL": ""}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # First life: API only (--workers 0), so the tasks can only wait.
    first = taskman(
        "serve",
        "--phase",
        "2",
        "--port",
        str(port),
        "--workers",
        "0",
        env=env,
        log=tmp_path / "first.log",
    )
    try:
        wait_http(f"{base}/health", process=first)
        with httpx.Client(base_url=base, timeout=10) as client:
            ids = [
                client.post(
                    "/tasks", json={"type": "echo", "payload": {"value": i}}
                ).json()["id"]
                for i in range(5)
            ]
            assert client.get("/health").json()["queued"] == 5
        time.sleep(1.2)  # the AOF is fsynced every second
        children = descendants(first.pid)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
    time.sleep(0.2)
    assert [pid for pid in children if alive(pid)] == [], "embedded Redis left behind"
    # Second life: same data directory, now with a worker.
    second = taskman(
        "serve",
        "--phase",
        "2",
        "--port",
        str(port),
        "--workers",
        "1",
        env=env,
        log=tmp_path / "second.log",
    )
    try:
        wait_http(f"{base}/health", process=second)
        with httpx.Client(base_url=base, timeout=10) as client:
            for i, task_id in enumerate(ids):
                deadline = time.monotonic() + 30
                while (task := client.get(f"/tasks/{task_id}").json())[
                    "status"
                ] != "succeeded":
                    assert time.monotonic() < deadline, task
                    time.sleep(0.05)
                assert task["result"] == i
        children = descendants(second.pid)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    time.sleep(0.2)
    assert [pid for pid in children if alive(pid)] == []
