"""The contract of docs/contract.md, run once per phase."""

import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from common.settings import Settings
from tests.conftest import CAPACITY, submit, wait_for

# SHA-256 chained 1000 times over b"taskman" (docs/contract.md), worked out once.
TASKMAN_X1000 = "c5717e50f784f8c8392ef30eb6e46e2f6a5e2316ab5b2e5c453106e5d41fa950"


@pytest.mark.parametrize(
    ("type_", "payload", "result"),
    [
        ("echo", {"value": {"a": [1, 2.5, None, "é"]}}, {"a": [1, 2.5, None, "é"]}),
        ("sleep", {"seconds": 0.05}, {"slept": 0.05}),
        ("primes", {"limit": 100_000}, {"count": 9592}),
        ("primes", {"limit": 2}, {"count": 1}),
        (
            "hash",
            {"data": "taskman", "iterations": 1000},
            {"digest": TASKMAN_X1000},
        ),
        ("flaky", {"fail_times": 0}, {"attempts": 1}),
    ],
)
def test_each_task_type_gives_its_result(
    client: TestClient, type_: str, payload: dict[str, Any], result: Any
) -> None:
    task = wait_for(client, submit(client, type_, **payload)["id"])
    assert task["status"] == "succeeded", task
    assert task["result"] == result
    assert task["error"] is None
    assert task["attempts"] == 1


def test_post_answers_202_at_once_with_the_queued_task(client: TestClient) -> None:
    body = {"type": "primes", "payload": {"limit": 1000}, "max_retries": 2}
    response = client.post("/tasks", json=body)
    assert response.status_code == 202
    task = response.json()
    assert response.headers["location"] == f"/tasks/{task['id']}"
    assert task["status"] == "queued"
    assert task["type"] == "primes"
    assert task["payload"] == {"limit": 1000}
    assert task["max_retries"] == 2
    assert task["attempts"] == 0
    assert task["result"] is None and task["started_at"] is None
    assert client.get(f"/tasks/{task['id']}").json()["id"] == task["id"]


def test_post_does_not_wait_for_a_long_task(client: TestClient) -> None:
    started = time.monotonic()
    task = submit(client, "sleep", seconds=5)
    assert time.monotonic() - started < 2
    assert task["status"] == "queued"
    running = wait_for(client, task["id"], "running")
    assert running["finished_at"] is None
    client.delete(f"/tasks/{task['id']}")


def test_timestamps_are_utc_and_in_order(client: TestClient) -> None:
    task = wait_for(client, submit(client, "sleep", seconds=0.05)["id"])
    created, started, finished = (
        datetime.fromisoformat(task[key].replace("Z", "+00:00"))
        for key in ("created_at", "started_at", "finished_at")
    )
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
    assert created <= started <= finished


def test_default_max_retries_comes_from_settings(client: TestClient) -> None:
    assert submit(client, "echo", value=1)["max_retries"] == 3


def test_flaky_task_is_retried_then_succeeds(client: TestClient) -> None:
    task = wait_for(client, submit(client, "flaky", fail_times=2, max_retries=3)["id"])
    assert task["status"] == "succeeded", task
    assert task["result"] == {"attempts": 3}
    assert task["attempts"] == 3
    # The failed attempts reported progress; the last, which did not, shows none.
    assert task["progress"] is None, task


def test_flaky_task_without_enough_retries_fails(client: TestClient) -> None:
    task = wait_for(client, submit(client, "flaky", fail_times=3, max_retries=1)["id"])
    assert task["status"] == "failed", task
    assert task["attempts"] == 2
    assert "fails on purpose" in task["error"]
    assert task["progress"]["message"] == "attempt 2 is about to fail", task


def test_fail_task_ends_failed_with_a_readable_error(client: TestClient) -> None:
    task = wait_for(client, submit(client, "fail", message="boom", max_retries=2)["id"])
    assert task["status"] == "failed"
    assert task["attempts"] == 3
    assert task["error"] == "RuntimeError: boom"
    assert task["result"] is None
    assert task["finished_at"] is not None


def test_cancel_a_queued_task(client: TestClient) -> None:
    blockers = [submit(client, "sleep", seconds=30)["id"] for _ in range(CAPACITY)]
    for blocker in blockers:
        wait_for(client, blocker, "running")
    queued = submit(client, "echo", value="never")
    response = client.delete(f"/tasks/{queued['id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    for blocker in blockers:
        assert client.delete(f"/tasks/{blocker}").json()["status"] == "canceled"
    # The freed runners skip the canceled task rather than run it.
    follower = wait_for(client, submit(client, "echo", value=1)["id"])
    assert follower["status"] == "succeeded"
    task = client.get(f"/tasks/{queued['id']}").json()
    assert task["status"] == "canceled" and task["attempts"] == 0


@pytest.mark.parametrize(
    ("type_", "payload"),
    [
        ("sleep", {"seconds": 60}),
        # primes is left out: its sieve does even 20M in ~0.1 s here, too quick to
        # catch while running. Its checkpoints are the same as hash's.
        ("hash", {"data": "x", "iterations": 2_000_000}),
    ],
)
def test_cancel_a_running_task_stops_it_within_a_second(
    client: TestClient,
    phase: Any,
    settings: Settings,
    type_: str,
    payload: dict[str, Any],
) -> None:
    # Every runner of this kind busy, so the follower below can only run on one
    # that a cancel freed: phase 1's CPU lane has cpu_workers, else CAPACITY.
    in_pool = phase.__name__ == "phase1_inprocess" and type_ == "hash"
    runners = settings.cpu_workers if in_pool else CAPACITY
    busy = [submit(client, type_, **payload) for _ in range(runners)]
    for running in busy:
        wait_for(client, running["id"], "running")
    task = busy[0]
    for running in busy:
        response = client.delete(f"/tasks/{running['id']}")
        assert response.status_code == 200
        assert response.json()["status"] == "canceled"
    # The runner is free again: a task of the same kind after it runs at once.
    small = {"sleep": {"seconds": 0}, "hash": {"data": "x", "iterations": 1}}[type_]
    follower = wait_for(client, submit(client, type_, **small)["id"], timeout=10)
    assert follower["status"] == "succeeded"
    canceled = client.get(f"/tasks/{task['id']}").json()
    assert canceled["status"] == "canceled" and canceled["result"] is None
    freed_after = datetime.fromisoformat(
        follower["started_at"]
    ) - datetime.fromisoformat(canceled["finished_at"])
    assert freed_after < timedelta(seconds=2)


def test_cancel_a_finished_task_is_409(client: TestClient) -> None:
    task = wait_for(client, submit(client, "echo", value=1)["id"])
    response = client.delete(f"/tasks/{task['id']}")
    assert response.status_code == 409
    assert "succeeded" in response.json()["detail"]
    assert client.get(f"/tasks/{task['id']}").json()["status"] == "succeeded"


@pytest.mark.parametrize(
    "task_id", ["0" * 32, "nope", "x" * 5000, "..%2F..%2Fetc%2Fpasswd"]
)
def test_unknown_task_is_404_for_get_and_delete(
    client: TestClient, task_id: str
) -> None:
    for response in (
        client.get(f"/tasks/{task_id}"),
        client.delete(f"/tasks/{task_id}"),
    ):
        assert response.status_code == 404
        assert response.json()["detail"] in ("task not found", "Not Found")


@pytest.mark.parametrize(
    "body",
    [
        {"type": "nope", "payload": {}},
        {"type": "echo"},
        {"payload": {"value": 1}},
        {"type": "echo", "payload": {}},
        {"type": "echo", "payload": {"value": 1}, "extra": True},
        {"type": "sleep", "payload": {"seconds": 1, "extra": 1}},
        {"type": "sleep", "payload": {"seconds": "1"}},
        {"type": "sleep", "payload": {"seconds": 61}},
        {"type": "sleep", "payload": {"seconds": -1}},
        {"type": "primes", "payload": {"limit": 1}},
        {"type": "primes", "payload": {"limit": 20_000_001}},
        {"type": "primes", "payload": {"limit": 10.5}},
        {"type": "primes", "payload": {"limit": True}},
        {"type": "hash", "payload": {"data": "x", "iterations": 0}},
        {"type": "hash", "payload": {"data": "x" * 16385, "iterations": 1}},
        {"type": "flaky", "payload": {"fail_times": 11}},
        {"type": "fail", "payload": {"message": "x" * 1025}},
        {"type": "echo", "payload": {"value": "x" * 17000}},
        {"type": "echo", "payload": {"value": 1}, "max_retries": 11},
        {"type": "echo", "payload": {"value": 1}, "max_retries": -1},
        {"type": "echo", "payload": {"value": 1}, "max_retries": "3"},
        {"type": ["echo"], "payload": {"value": 1}},
        {"type": "echo", "payload": [1]},
        [1, 2],
        "echo",
        None,
    ],
)
def test_bad_task_requests_are_422_json(client: TestClient, body: Any) -> None:
    response = client.post("/tasks", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"type": "echo", "payload": {"value": 1}', "application/json"),
        (b'{"type": "echo", "payload": {"value": NaN}}', "application/json"),
        (b"\xff\xfe not utf-8", "application/json"),
        (b"type=echo", "application/x-www-form-urlencoded"),
        (b'{"type": "echo", "payload": {"value": 1}}', "text/plain"),
        (b"", "application/json"),
    ],
)
def test_bodies_that_are_not_json_are_rejected(
    client: TestClient, content: bytes, content_type: str
) -> None:
    response = client.post(
        "/tasks", content=content, headers={"content-type": content_type}
    )
    assert response.status_code in (415, 422), response.text
    assert response.json()["detail"]


def test_body_over_the_limit_is_413_json(client: TestClient) -> None:
    body = b'{"type": "echo", "payload": {"value": "' + b"x" * 70_000 + b'"}}'
    response = client.post(
        "/tasks", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "detail" in response.json()


def test_streamed_body_over_the_limit_is_413_json(client: TestClient) -> None:
    def chunks() -> Any:
        yield b'{"type": "echo", "payload": {"value": "'
        for _ in range(10):
            yield b"x" * 10_000
        yield b'"}}'

    response = client.post(
        "/tasks", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "detail" in response.json()


def test_a_repeated_idempotency_key_returns_the_first_task(client: TestClient) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"type": "echo", "payload": {"value": "once"}}
    first = client.post("/tasks", json=body, headers=key)
    again = client.post("/tasks", json=body, headers=key)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    other = client.post(
        "/tasks", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}
    )
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_an_idempotency_key_with_another_body_is_409(client: TestClient) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    client.post("/tasks", json={"type": "echo", "payload": {"value": 1}}, headers=key)
    response = client.post(
        "/tasks", json={"type": "echo", "payload": {"value": 2}}, headers=key
    )
    assert response.status_code == 409
    assert "Idempotency-Key" in response.json()["detail"]


def test_an_idempotency_key_over_128_chars_is_422(client: TestClient) -> None:
    response = client.post(
        "/tasks",
        json={"type": "echo", "payload": {"value": 1}},
        headers={"Idempotency-Key": "k" * 129},
    )
    assert response.status_code == 422


def test_health_names_the_phase(client: TestClient, phase: Any) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["phase"] == int(phase.__name__[5])


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/tasks"), ("PATCH", "/health"), ("GET", "/nothing-here")],
)
def test_unknown_routes_and_methods_answer_json(
    client: TestClient, method: str, path: str
) -> None:
    response = client.request(method, path)
    assert response.status_code in (404, 405)
    assert response.json()["detail"]
