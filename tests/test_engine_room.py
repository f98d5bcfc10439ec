"""Phase 3's engine room: its fast paths write and do what plain RQ would.

Each optimisation leans on something RQ does not promise (its job format, when
its worker calls which method); these tests are where an RQ upgrade that changes
one of those fails, rather than a job.
"""

import asyncio
import json
import math
import subprocess
import sys
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

import phase2_queue
import phase3_production
from common.listing import position
from common.settings import Settings
from phase2_queue.jobs import index_key, queue_names
from phase3_production.enqueue import ENQUEUE
from phase3_production.fastsubmit import FastSubmit
from phase3_production.jobloop import wake_key
from tests.conftest import submit, wait_for
from tests.processes import drain_queue
from tests.test_phase2 import start_worker


@pytest.fixture
def queue_settings(redis_url: str) -> Settings:
    """A queue no session worker listens to: the test decides who runs what."""
    return Settings(
        redis_url=redis_url,
        queue_name=f"e{uuid.uuid4().hex[:8]}",
        retry_backoff=[0],
        rate_limit_submit="100000/second",
    )


# A moment to schedule at, the same for both phases (so their scores and metas
# compare): an hour ahead, to the millisecond.
RUN_AT = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="milliseconds")


def placement(connection: redis.Redis, settings: Settings, task: Any) -> Any:
    """Where a task's job is: which queue's list holds its id, which scheduled
    registry and at what score (relative to its due time), and its index entry."""
    names = queue_names(settings)
    due = (
        math.ceil(datetime.fromisoformat(task["run_at"]).timestamp())
        if task["run_at"]
        else 0
    )
    member = position(task["id"], datetime.fromisoformat(task["created_at"]))
    return {
        "queued in": [
            name
            for name in names
            if task["id"].encode() in connection.lrange(f"rq:queue:{name}", 0, -1)
        ],
        "scheduled in": [
            (name, score - due)
            for name in names
            if (score := connection.zscore(f"rq:scheduled:{name}", task["id"]))
            is not None
        ],
        "known queues": sorted(
            name
            for name in names
            if connection.sismember("rq:queues", f"rq:queue:{name}")
        ),
        "indexed": connection.zscore(index_key(settings), member),
    }


@pytest.mark.parametrize(
    "options",
    [
        {"max_retries": 0},
        {"max_retries": 3},
        {"priority": "high"},
        {"priority": "low", "max_retries": 2},
        {"run_at": RUN_AT},
        {"run_at": RUN_AT, "priority": "high", "max_retries": 1},
        {"delay_seconds": 3600, "priority": "low"},
    ],
)
def test_the_fast_enqueue_stores_the_job_as_phase_2s_plain_enqueue_does(
    queue_settings: Settings, options: dict[str, Any]
) -> None:
    """Phase 3's POST writes RQ's job hash itself (enqueue.py); field for field it
    must be what phase 2's ``Queue.enqueue`` (``enqueue_at`` for a due time)
    writes for the same task, in the same queue or scheduled registry, with the
    same index entry."""
    connection = redis.Redis.from_url(str(queue_settings.redis_url))
    body = {"type": "echo", "payload": {"value": [1, "é"]}, **options}
    jobs, places = [], []
    for phase in (phase3_production, phase2_queue):
        with TestClient(phase.create_app(queue_settings)) as client:
            response = client.post("/tasks", json=body)
            assert response.status_code == 202, response.text
            task = response.json()
        jobs.append(connection.hgetall(f"rq:job:{task['id']}"))
        places.append(placement(connection, queue_settings, task))
    drain_queue(queue_settings)
    ours, theirs = jobs

    assert places[0] == places[1]
    assert places[0]["indexed"] == 0
    assert ours.keys() == theirs.keys()
    # The moments differ (two tasks); each is a timestamp in RQ's format.
    for fields in (ours, theirs):
        for name in (b"created_at", b"enqueued_at"):
            if name in fields:
                moment = fields.pop(name).decode()
                datetime.strptime(moment, "%Y-%m-%dT%H:%M:%S.%fZ")
    # JSON fields: compare what they say, not their spacing (nor the compression).
    data = [zlib.decompress(fields.pop(b"data")) for fields in (ours, theirs)]
    assert json.loads(data[0]) == json.loads(data[1])
    intervals = [fields.pop(b"retry_intervals", b"null") for fields in (ours, theirs)]
    assert json.loads(intervals[0]) == json.loads(intervals[1])
    if "delay_seconds" in options:  # two due times, a moment apart
        metas = [json.loads(fields.pop(b"meta")) for fields in (ours, theirs)]
        assert metas[0].keys() == metas[1].keys() == {"max_retries", "run_at"}
    assert ours == theirs


def test_an_enqueue_sent_twice_queues_the_task_once(queue_settings: Settings) -> None:
    """redis-py repeats a call whose connection failed, even if the call had reached
    Redis: the enqueue script must leave one job, queued once. (Plain RQ's
    enqueue, sent twice, queues twice: docs/phase2.md.)"""
    connection = redis.Redis.from_url(str(queue_settings.redis_url))
    with TestClient(phase3_production.create_app(queue_settings)) as client:
        task = submit(client, "echo", value="once")
    job_key = f"rq:job:{task['id']}"
    queue_key = f"rq:queue:{queue_settings.queue_name}"
    index = index_key(queue_settings)
    member = position(task["id"], datetime.fromisoformat(task["created_at"]))
    flat = [item for pair in connection.hgetall(job_key).items() for item in pair]
    wake = wake_key(queue_settings.queue_name)
    keys = ["", index, job_key, queue_key, queue_key, wake]
    args = [f" {task['id']}", 60, 0, task["id"], member, "", len(flat), *flat]
    again = connection.eval(ENQUEUE, len(keys), *keys, *args)
    assert again is None
    queued = connection.lrange(queue_key, 0, -1)
    assert queued == [task["id"].encode()]
    assert connection.zcard(index) == 1
    drain_queue(queue_settings)


def rq_cli(settings: Settings, *args: str) -> None:
    rq = str(Path(sys.executable).parent / "rq")
    url = ["--url", str(settings.redis_url)]
    subprocess.run([rq, *args, *url], check=True, capture_output=True, timeout=30)


def test_the_worker_skips_round_trips_but_not_what_rq_tools_show(
    queue_settings: Settings,
) -> None:
    """Phase 3's worker writes its state and heartbeat less often than RQ's: rq
    info and the dashboard must still see busy and idle, and `rq suspend` must
    still hold it back from new jobs."""
    connection = redis.Redis.from_url(str(queue_settings.redis_url))

    def states() -> set[bytes]:
        keys = connection.smembers(f"rq:workers:{queue_settings.queue_name}")
        return {connection.hget(key, "state") or b"" for key in keys}

    worker = start_worker(queue_settings, phase=3)
    try:
        with TestClient(phase3_production.create_app(queue_settings)) as client:
            task = submit(client, "sleep", seconds=1)
            wait_for(client, task["id"], "running")
            assert states() == {b"busy"}
            wait_for(client, task["id"])
            deadline = time.monotonic() + 5
            while states() != {b"idle"} and time.monotonic() < deadline:
                time.sleep(0.05)
            assert states() == {b"idle"}

            # A suspended worker finishes its job, then takes no other.
            busy = submit(client, "sleep", seconds=1.5)
            wait_for(client, busy["id"], "running")
            rq_cli(queue_settings, "suspend")
            held = submit(client, "echo", value="held")
            wait_for(client, busy["id"])
            time.sleep(1.5)
            assert client.get(f"/tasks/{held['id']}").json()["status"] == "queued"
            rq_cli(queue_settings, "resume")
            assert wait_for(client, held["id"])["status"] == "succeeded"
    finally:
        rq_cli(queue_settings, "resume")
        worker.kill()
        worker.wait()


# --- the fast submit (fastsubmit.py): a valid POST /tasks answered in front of FastAPI

ECHO = {"type": "echo", "payload": {"value": 1}}
# Not exactly "application/json": FastAPI's route answers it, not the fast submit.
BY_APP = {"Content-Type": "application/json; charset=utf-8"}


def comparable_headers(response: Any) -> list[tuple[bytes, bytes]]:
    """The raw header lines; the rate limit's changing counts left out."""
    changing = (b"ratelimit", b"x-ratelimit-remaining", b"x-ratelimit-reset")
    return [(n, v) for n, v in response.headers.raw if n.lower() not in changing]


def test_the_fast_submit_answers_as_the_app_does(queue_settings: Settings) -> None:
    key = {"Idempotency-Key": f"fast-{uuid.uuid4().hex}"}
    body = json.dumps(ECHO).encode()
    with TestClient(phase3_production.create_app(queue_settings)) as client:
        fast = client.post("/tasks", json=ECHO)
        by_app = client.post("/tasks", content=body, headers=BY_APP)
        first = client.post("/tasks", json=ECHO, headers=key)
        again_fast = client.post("/tasks", json=ECHO, headers=key)
        again_by_app = client.post("/tasks", content=body, headers={**BY_APP, **key})
        scrape = client.get("/metrics").text
    assert (fast.status_code, by_app.status_code, first.status_code) == (202,) * 3
    tasks = [fast.json(), by_app.json()]
    for task in tasks:
        del task["id"], task["created_at"]
    assert tasks[0] == tasks[1]
    ids = [fast.json()["id"], by_app.json()["id"]]
    assert [r.headers["location"] for r in (fast, by_app)] == [
        f"/tasks/{i}" for i in ids
    ]
    assert [n for n, _ in comparable_headers(fast)] == [
        n for n, _ in comparable_headers(by_app)
    ]
    # A repeated key answers the first task: the two paths, byte for byte.
    assert again_fast.status_code == again_by_app.status_code == 200
    assert again_fast.json()["id"] == first.json()["id"]
    assert again_fast.content == again_by_app.content
    assert comparable_headers(again_fast) == comparable_headers(again_by_app)
    assert "ratelimit" in again_fast.headers
    # The metrics cannot tell the paths apart: one route template.
    line = 'taskman_http_requests_total{method="POST",route="/tasks",status="202"} 3.0'
    assert line in scrape, scrape
    drain_queue(queue_settings)


def test_the_fast_submit_leaves_every_doubtful_request_to_the_app(
    queue_settings: Settings,
) -> None:
    """What the app gets is what the client sent, however it was sent; the 4xx
    are the app's (tests/test_bad_input.py holds them to the contract)."""
    reached: list[tuple[bytes, bytes]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        reached.append((scope["method"].encode(), body))

    fast = FastSubmit(app, max_body_bytes=100)

    async def post(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> None:
        messages = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]

        async def receive() -> Message:
            return messages.pop(0)

        async def send(message: Message) -> None:
            raise AssertionError(f"the fast submit answered: {message}")

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/tasks",
            "query_string": b"",
            "headers": headers,
        }
        await fast(scope, receive, send)

    json_type = (b"content-type", b"application/json")
    doubtful = [
        ([json_type, (b"content-length", b"3")], [b"{", b"]}"]),  # not JSON
        ([json_type, (b"content-length", b"2")], [b"[]"]),  # not a task
        ([json_type, (b"content-length", b"101")], [b"x" * 101]),  # over the limit
        ([json_type, (b"transfer-encoding", b"chunked")], [b'{"type"', b": 1}"]),
        ([(b"content-type", b"text/plain"), (b"content-length", b"2")], [b"{}"]),
        (
            [json_type, (b"content-length", b"41"), (b"idempotency-key", b"\x01")],
            [json.dumps(ECHO).encode()],
        ),
    ]
    for headers, chunks in doubtful:
        asyncio.run(post(headers, chunks))
    assert reached == [(b"POST", b"".join(chunks)) for _, chunks in doubtful]
