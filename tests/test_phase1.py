"""What only phase 1 does: one process, a loop kept free, bounded memory, and the
loss on shutdown that motivates phase 2."""

import logging
import time

import pytest
from fastapi.testclient import TestClient

from common.settings import Settings
from phase1_inprocess import create_app
from tests.conftest import submit, wait_for


def phase1(**overrides: object) -> TestClient:
    values: dict[str, object] = {
        "retry_backoff": [0],
        "cpu_workers": 1,
        "io_concurrency": 1,
        "shutdown_timeout": 1,
    }
    return TestClient(create_app(Settings(**(values | overrides))))


def test_health_answers_while_cpu_tasks_keep_the_pool_busy() -> None:
    with phase1() as client:
        ids = [
            submit(client, "hash", data="x", iterations=2_000_000)["id"]
            for _ in range(3)
        ]
        wait_for(client, ids[0], "running")
        for _ in range(20):
            assert client.get("/health").status_code == 200
        # The loop answered all of that while the CPU work was still going on.
        statuses = [client.get(f"/tasks/{i}").json()["status"] for i in ids]
        assert "succeeded" not in statuses[1:], statuses
        for task_id in ids:
            assert wait_for(client, task_id)["status"] == "succeeded"


def test_a_full_queue_answers_503_and_accepts_nothing() -> None:
    with phase1(max_queued=2) as client:
        running = submit(client, "sleep", seconds=30)
        wait_for(client, running["id"], "running")
        waiting = [submit(client, "echo", value=i) for i in range(2)]
        response = client.post("/tasks", json={"type": "echo", "payload": {"value": 3}})
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert "waiting" in response.json()["detail"]
        assert client.get("/health").json()["queued"] == 2
        client.delete(f"/tasks/{running['id']}")
        for task in waiting:
            assert wait_for(client, task["id"])["status"] == "succeeded"
        # Room again: accepted and run.
        assert wait_for(client, submit(client, "echo", value=4)["id"])["result"] == 4


def test_finished_tasks_expire_after_the_retention() -> None:
    with phase1(retention_seconds=1) as client:
        done = wait_for(client, submit(client, "echo", value=1)["id"])
        assert client.get(f"/tasks/{done['id']}").status_code == 200
        time.sleep(1.1)
        later = submit(client, "echo", value=2)  # expiry is swept on the way in
        assert client.get(f"/tasks/{done['id']}").status_code == 404
        listed = client.get("/tasks").json()["tasks"]
        assert [task["id"] for task in listed] == [later["id"]]  # gone from it too


def test_a_retrying_task_can_be_canceled() -> None:
    with phase1(retry_backoff=[30]) as client:
        task = submit(client, "fail", message="again", max_retries=5)
        wait_for(client, task["id"], "retrying")
        canceled = client.delete(f"/tasks/{task['id']}").json()
        assert canceled["status"] == "canceled"
        assert canceled["attempts"] == 1
        assert canceled["error"] == "RuntimeError: again"


def test_shutdown_says_how_many_queued_tasks_are_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskman"), phase1() as client:
        sleeper = submit(client, "sleep", seconds=30)
        wait_for(client, sleeper["id"], "running")
        for i in range(3):
            submit(client, "echo", value=i)
    assert "3 queued task(s) are lost" in caplog.text
    assert "canceled mid-run" in caplog.text


def test_shutdown_counts_the_scheduled_tasks_it_loses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskman"), phase1() as client:
        body = {"type": "echo", "payload": {"value": 1}, "delay_seconds": 60}
        for _ in range(2):
            assert client.post("/tasks", json=body).json()["status"] == "scheduled"
    # Their timers lived in the process: a restart forgets them (phase 2 does not).
    assert "2 scheduled and 0 queued task(s) are lost" in caplog.text


def test_a_batch_that_would_overfill_the_queue_is_503_and_accepts_nothing() -> None:
    with phase1(max_queued=3) as client:
        running = submit(client, "sleep", seconds=30)
        wait_for(client, running["id"], "running")
        echo = {"type": "echo", "payload": {"value": 1}}
        scheduled = client.post("/tasks", json=echo | {"delay_seconds": 60}).json()
        # One scheduled task waits too: two more fit, not three.
        response = client.post("/tasks/batch", json={"tasks": [echo] * 3})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        listed = client.get("/tasks").json()["tasks"]
        assert [task["id"] for task in listed] == [scheduled["id"], running["id"]]
        assert (
            client.post("/tasks/batch", json={"tasks": [echo] * 2}).status_code == 202
        )
        client.delete(f"/tasks/{running['id']}")
