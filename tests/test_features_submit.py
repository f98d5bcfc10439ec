"""Issue 11's features of docs/contract.md on the way in (scheduling, priority,
batches), run once per phase; tests/test_features.py has the reading side."""

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import submit, wait_for
from tests.test_features import assert_422, newest, post, runners_busy, when

# --- scheduling


def test_delay_seconds_keeps_a_task_scheduled_until_due(client: TestClient) -> None:
    task = post(client, {"type": "echo", "payload": {"value": 1}, "delay_seconds": 1})
    assert task["status"] == "scheduled"
    ahead = when(task, "run_at") - when(task, "created_at")
    assert timedelta(seconds=0.9) <= ahead <= timedelta(seconds=1.1)
    assert client.get(f"/tasks/{task['id']}").json()["status"] == "scheduled"
    listed = client.get("/tasks", params={"status": "scheduled"}).json()["tasks"]
    assert task["id"] in [t["id"] for t in listed]
    done = wait_for(client, task["id"], timeout=20)
    assert done["status"] == "succeeded" and done["result"] == 1
    assert when(done, "started_at") >= when(task, "run_at")


def test_run_at_schedules_a_task_at_that_moment(client: TestClient) -> None:
    due = datetime.now(UTC) + timedelta(seconds=1)
    run_at = due.isoformat().replace("+00:00", "Z")
    body = {"type": "echo", "payload": {"value": 2}, "run_at": run_at}
    task = post(client, body)
    assert task["status"] == "scheduled"
    assert when(task, "run_at") == due
    done = wait_for(client, task["id"], timeout=20)
    assert done["status"] == "succeeded"
    assert when(done, "started_at") >= due


def test_a_delay_of_zero_queues_at_once(client: TestClient) -> None:
    task = post(client, {"type": "echo", "payload": {"value": 1}, "delay_seconds": 0})
    assert task["status"] == "queued" and task["run_at"] is None
    assert wait_for(client, task["id"])["status"] == "succeeded"


def later(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


@pytest.mark.parametrize(
    ("when_", "kind"),
    [
        ({"run_at": later(minutes=-1)}, "run_at_past"),
        ({"run_at": later(hours=25)}, "run_at_too_far"),
        ({"run_at": "2030-01-01T00:00:00"}, "timezone_aware"),
        ({"run_at": "tomorrow"}, None),
        ({"run_at": 1_800_000_000}, "datetime_type"),
        ({"run_at": later(minutes=5), "delay_seconds": 5}, "delay_and_run_at"),
        ({"delay_seconds": -1}, "greater_than_equal"),
        ({"delay_seconds": 86401}, "less_than_equal"),
        ({"delay_seconds": "5"}, None),
        ({"priority": "urgent"}, "enum"),
    ],
)
def test_bad_schedules_and_priorities_are_422_json(
    client: TestClient, when_: dict[str, Any], kind: str | None
) -> None:
    before = newest(client)
    response = client.post(
        "/tasks", json={"type": "echo", "payload": {"value": 1}} | when_
    )
    problems = assert_422(response, "body")
    if kind is not None:
        assert kind in [problem["type"] for problem in problems], problems
    assert newest(client) == before


def test_a_canceled_scheduled_task_never_runs(client: TestClient) -> None:
    body = {"type": "echo", "payload": {"value": 1}, "delay_seconds": 1}
    doomed, control = post(client, body), post(client, body)
    response = client.delete(f"/tasks/{doomed['id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    # Once the one scheduled alongside it has run, its moment has surely passed.
    assert wait_for(client, control["id"], timeout=20)["status"] == "succeeded"
    task = client.get(f"/tasks/{doomed['id']}").json()
    assert task["status"] == "canceled"
    assert task["attempts"] == 0 and task["started_at"] is None
    assert client.delete(f"/tasks/{doomed['id']}").status_code == 409


# --- priority


def test_high_priority_runs_first_and_fifo_within_a_priority(
    client: TestClient,
) -> None:
    with runners_busy(client) as blockers:
        order = ["low", "normal", "high", "low", "high", "normal"]
        tasks = [
            post(client, {"type": "echo", "payload": {"value": i}, "priority": p})
            for i, p in enumerate(order)
        ]
        assert [task["priority"] for task in tasks] == order
        # One runner is freed: it takes the waiting tasks one by one.
        client.delete(f"/tasks/{blockers[0]}")
        done = [wait_for(client, task["id"]) for task in tasks]
    ran = sorted(done, key=lambda task: when(task, "started_at"))
    assert [task["payload"]["value"] for task in ran] == [2, 4, 1, 5, 0, 3]


def test_a_retry_keeps_its_priority(client: TestClient) -> None:
    with runners_busy(client) as blockers:
        low = post(client, {"type": "echo", "payload": {"value": 1}, "priority": "low"})
        flaky = {"type": "flaky", "payload": {"fail_times": 1}, "max_retries": 1}
        high = post(client, flaky | {"priority": "high"})
        client.delete(f"/tasks/{blockers[0]}")
        high_done, low_done = wait_for(client, high["id"]), wait_for(client, low["id"])
    assert high_done["status"] == "succeeded" and high_done["attempts"] == 2
    assert high_done["priority"] == "high"
    # Its second attempt, back in the high queue, still went before the low task.
    assert when(high_done, "started_at") <= when(low_done, "started_at")


def test_priority_defaults_to_normal(client: TestClient) -> None:
    assert submit(client, "echo", value=1)["priority"] == "normal"


# --- POST /tasks/batch


def batch_of(count: int) -> dict[str, Any]:
    return {"tasks": [{"type": "echo", "payload": {"value": i}} for i in range(count)]}


def test_a_batch_is_queued_in_order(client: TestClient) -> None:
    body: dict[str, list[dict[str, Any]]] = {
        "tasks": [
            {"type": "echo", "payload": {"value": "first"}},
            {"type": "primes", "payload": {"limit": 1000}, "priority": "high"},
            {"type": "hash", "payload": {"data": "x", "iterations": 1}},
            {"type": "echo", "payload": {"value": "later"}, "delay_seconds": 1},
            {"type": "flaky", "payload": {"fail_times": 0}, "max_retries": 0},
        ]
    }
    response = client.post("/tasks/batch", json=body)
    assert response.status_code == 202, response.text
    tasks = response.json()["tasks"]
    assert [(t["type"], t["payload"]) for t in tasks] == [
        (t["type"], t["payload"]) for t in body["tasks"]
    ]
    assert len({task["id"] for task in tasks}) == 5
    assert [task["status"] for task in tasks] == [
        "queued",
        "queued",
        "queued",
        "scheduled",
        "queued",
    ]
    assert tasks[1]["priority"] == "high" and tasks[4]["max_retries"] == 0
    results = [wait_for(client, task["id"])["result"] for task in tasks]
    assert results[:2] == ["first", {"count": 168}]
    assert results[3:] == ["later", {"attempts": 1}]


@pytest.mark.parametrize("count", [0, 1001])
def test_a_batch_of_0_or_over_1000_tasks_is_422(client: TestClient, count: int) -> None:
    before = newest(client)
    assert_422(client.post("/tasks/batch", json=batch_of(count)), "body", "tasks")
    assert newest(client) == before


def test_a_batch_of_1000_is_accepted(client: TestClient) -> None:
    response = client.post("/tasks/batch", json=batch_of(1000))
    assert response.status_code == 202, response.text
    assert len(response.json()["tasks"]) == 1000


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "primes", "payload": {"limit": 1}},
        {"type": "nope", "payload": {}},
        {"type": "echo", "payload": {"value": 1}, "priority": "urgent"},
        {"type": "echo", "payload": {"value": 1}, "extra": 1},
    ],
)
def test_one_bad_task_refuses_the_whole_batch(
    client: TestClient, bad: dict[str, Any]
) -> None:
    before = newest(client)
    body = batch_of(5)
    body["tasks"][3] = bad
    assert_422(client.post("/tasks/batch", json=body), "body", "tasks", 3)
    assert newest(client) == before  # nothing was queued


def test_an_idempotency_key_covers_the_batch(client: TestClient) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.post("/tasks/batch", json=batch_of(3), headers=key)
    assert first.status_code == 202
    before = newest(client)
    again = client.post("/tasks/batch", json=batch_of(3), headers=key)
    assert again.status_code == 200
    assert [t["id"] for t in again.json()["tasks"]] == [
        t["id"] for t in first.json()["tasks"]
    ]
    other = client.post("/tasks/batch", json=batch_of(4), headers=key)
    assert other.status_code == 409
    assert "Idempotency-Key" in other.json()["detail"]
    assert newest(client) == before


def test_a_batch_over_the_body_limit_is_413_json(client: TestClient) -> None:
    body = {"tasks": [{"type": "echo", "payload": {"value": "x" * 1000}}] * 70}
    response = client.post("/tasks/batch", json=body)
    assert response.status_code == 413
    assert "bytes" in response.json()["detail"]
