"""Issue 11's features of docs/contract.md, run once per phase like
tests/test_api.py: list, wait, events and progress here; scheduling, priority and
batches in tests/test_features_submit.py."""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import CAPACITY, submit, wait_for


def post(client: TestClient, body: dict[str, Any], status: int = 202) -> Any:
    response = client.post("/tasks", json=body)
    assert response.status_code == status, response.text
    return response.json()


def when(task: dict[str, Any], field: str) -> datetime:
    return datetime.fromisoformat(task[field])


def newest(client: TestClient) -> str | None:
    tasks = client.get("/tasks", params={"limit": 1}).json()["tasks"]
    return tasks[0]["id"] if tasks else None


def assert_422(response: Any, *loc: Any) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    problems: list[dict[str, Any]] = response.json()["detail"]
    assert any(tuple(p["loc"][: len(loc)]) == loc for p in problems), problems
    return problems


@contextmanager
def runners_busy(client: TestClient) -> Iterator[list[str]]:
    """Every runner of the I/O kind busy with a long sleep; canceled on the way out."""
    blockers = [submit(client, "sleep", seconds=30)["id"] for _ in range(CAPACITY)]
    try:
        for blocker in blockers:
            wait_for(client, blocker, "running")
        yield blockers
    finally:
        for blocker in blockers:
            client.delete(f"/tasks/{blocker}")


# --- GET /tasks


def test_list_answers_newest_first(client: TestClient) -> None:
    ids = [submit(client, "echo", value=i)["id"] for i in range(3)]
    page = client.get("/tasks", params={"limit": 3}).json()
    assert [task["id"] for task in page["tasks"]] == ids[::-1]
    assert {"status", "type", "progress", "priority"} <= set(page["tasks"][0])


def test_paging_with_the_cursor_reaches_the_end_without_gaps_or_repeats(
    client: TestClient,
) -> None:
    ids = [submit(client, "echo", value=i)["id"] for i in range(7)]
    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(3):  # our 7 are the newest: limit 3 shows them in 3 pages
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get("/tasks", params=params).json()
        assert len(page["tasks"]) <= 3
        seen += page["tasks"]
        cursor = page["next_cursor"]
    assert [task["id"] for task in seen[:7]] == ids[::-1]
    while cursor is not None:  # then on to the end: every older task, once
        page = client.get("/tasks", params={"limit": 1000, "cursor": cursor}).json()
        seen += page["tasks"]
        cursor = page["next_cursor"]
    all_ids = [task["id"] for task in seen]
    assert len(all_ids) == len(set(all_ids))
    created = [when(task, "created_at") for task in seen]
    assert created == sorted(created, reverse=True)


def test_list_filters_by_status_and_type(client: TestClient) -> None:
    echo = wait_for(client, submit(client, "echo", value=1)["id"])
    failed = wait_for(client, submit(client, "fail", message="x", max_retries=0)["id"])
    running = submit(client, "sleep", seconds=30)
    try:
        wait_for(client, running["id"], "running")
        for params, expected in [
            ({"status": "failed"}, failed),
            ({"status": "running"}, running),
            ({"type": "fail"}, failed),
            ({"status": "succeeded", "type": "echo"}, echo),
        ]:
            tasks = client.get("/tasks", params=params).json()["tasks"]
            assert expected["id"] in [task["id"] for task in tasks], params
            for task in tasks:
                assert task["status"] == params.get("status", task["status"])
                assert task["type"] == params.get("type", task["type"])
        shown = client.get("/tasks", params={"type": "sleep", "status": "failed"})
        assert running["id"] not in [task["id"] for task in shown.json()["tasks"]]
    finally:
        client.delete(f"/tasks/{running['id']}")


def test_a_filtered_page_looks_at_a_bounded_number_of_tasks(
    client: TestClient,
) -> None:
    failed = submit(client, "fail", message="old", max_retries=0)
    for i in range(12):
        submit(client, "echo", value=i)
    # limit 1 looks at 10 tasks: the 12 newer echoes fill the first page, which
    # holds none, yet says there is more; the next page reaches the failure.
    first = client.get("/tasks", params={"type": "fail", "limit": 1}).json()
    assert first["tasks"] == [] and first["next_cursor"] is not None
    params = {"type": "fail", "limit": 1, "cursor": first["next_cursor"]}
    second = client.get("/tasks", params=params).json()
    assert [task["id"] for task in second["tasks"]] == [failed["id"]]


@pytest.mark.parametrize("limit", [1, 1000])
def test_limit_takes_1_to_1000(client: TestClient, limit: int) -> None:
    submit(client, "echo", value=1)
    response = client.get("/tasks", params={"limit": limit})
    assert response.status_code == 200
    assert 1 <= len(response.json()["tasks"]) <= limit


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "nope"}, "cursor"),
        ({"cursor": "MTIzOmFiYw"}, "cursor"),  # base64, but not one of ours
        ({"cursor": "x" * 300}, "cursor"),
        ({"status": "lost"}, "status"),
        ({"type": "nope"}, "type"),
    ],
)
def test_bad_list_queries_are_422_json(
    client: TestClient, params: dict[str, Any], loc: str
) -> None:
    assert_422(client.get("/tasks", params=params), "query", loc)


# --- GET /tasks/{id}?wait=S and the event stream


def test_wait_answers_as_soon_as_the_task_finishes(client: TestClient) -> None:
    task = submit(client, "sleep", seconds=0.3)
    started = time.monotonic()
    response = client.get(f"/tasks/{task['id']}", params={"wait": 10})
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert time.monotonic() - started < 3  # far below the 10 s it could wait
    quick = submit(client, "echo", value="quick")
    started = time.monotonic()
    answer = client.get(f"/tasks/{quick['id']}", params={"wait": 10}).json()
    assert answer["status"] == "succeeded" and answer["result"] == "quick"
    assert time.monotonic() - started < 2


def test_wait_times_out_with_the_current_state(client: TestClient) -> None:
    task = submit(client, "sleep", seconds=30)
    try:
        started = time.monotonic()
        response = client.get(f"/tasks/{task['id']}", params={"wait": 1})
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert response.json()["status"] in ("queued", "running")
        assert 0.9 <= elapsed < 5
    finally:
        client.delete(f"/tasks/{task['id']}")


@pytest.mark.parametrize("wait", ["0", "31", "-1", "abc", "nan", "inf", ""])
def test_a_bad_wait_is_422_json(client: TestClient, wait: str) -> None:
    task = submit(client, "echo", value=1)
    response = client.get(f"/tasks/{task['id']}?wait={wait}")
    assert_422(response, "query", "wait")


def test_wait_for_an_unknown_task_is_404(client: TestClient) -> None:
    response = client.get(f"/tasks/{'0' * 32}", params={"wait": 1})
    assert response.status_code == 404


def read_events(client: TestClient, task_id: str) -> list[tuple[str, str, Any]]:
    """The whole stream as (id, event, data), read as it comes."""
    events: list[tuple[str, str, Any]] = []
    with client.stream("GET", f"/tasks/{task_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if fields:
                data = json.loads(fields["data"])
                events.append((fields.get("id", ""), fields["event"], data))
                fields = {}
    return events


def test_events_stream_each_change_then_close_at_the_end(client: TestClient) -> None:
    task = submit(client, "hash", data="x", iterations=1_000_000)
    events = read_events(client, task["id"])  # returns: the stream closed
    assert [number for number, _, _ in events] == [
        str(n) for n in range(1, len(events) + 1)
    ]
    assert {name for _, name, _ in events} == {"task"}
    statuses = [data["status"] for _, _, data in events]
    assert statuses[0] in ("queued", "running")
    assert statuses[-1] == "succeeded" and "succeeded" not in statuses[:-1]
    progress = [data["progress"]["done"] for _, _, data in events if data["progress"]]
    # Reported ~0.2 s apart over a second or so of hashing; phase 2's stream reads
    # the job 4 times a second, so a busy machine may show only one before the end.
    assert len(progress) >= 2, events
    assert progress == sorted(progress)
    assert events[-1][2]["progress"] == {
        "done": 1_000_000,
        "total": 1_000_000,
        "message": None,
    }


def test_events_of_a_finished_task_are_one_event(client: TestClient) -> None:
    task = wait_for(client, submit(client, "echo", value=1)["id"])
    events = read_events(client, task["id"])
    assert [(name, data["status"]) for _, name, data in events] == [
        ("task", "succeeded")
    ]


def test_events_of_an_unknown_task_are_404(client: TestClient) -> None:
    response = client.get(f"/tasks/{'0' * 32}/events")
    assert response.status_code == 404
    assert response.json()["detail"] == "task not found"


# --- progress


def test_progress_shows_on_get_while_running_and_stays_once_finished(
    client: TestClient,
) -> None:
    task = submit(client, "hash", data="x", iterations=1_000_000)
    deadline = time.monotonic() + 20
    while True:
        now = client.get(f"/tasks/{task['id']}").json()
        if now["progress"] is not None and now["status"] == "running":
            break
        assert now["status"] != "succeeded", "finished before any progress showed"
        assert time.monotonic() < deadline, now
        time.sleep(0.02)
    assert 0 <= now["progress"]["done"] < now["progress"]["total"] == 1_000_000
    done = wait_for(client, task["id"])
    assert done["progress"] == {"done": 1_000_000, "total": 1_000_000, "message": None}
    listed = client.get("/tasks", params={"limit": 1}).json()["tasks"][0]
    assert listed["id"] == task["id"] and listed["progress"] == done["progress"]


def test_primes_reports_its_progress(client: TestClient) -> None:
    task = wait_for(client, submit(client, "primes", limit=100_000)["id"])
    # It sieves up to the square root of the limit, then counts.
    assert task["progress"] == {"done": 316, "total": 316, "message": "counting"}
