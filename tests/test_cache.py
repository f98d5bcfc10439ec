"""Phase 3's result cache: finished tasks from Redis, never wrong, one read per
stampede, ETag and 304."""

import asyncio
import base64
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from common.models import Task
from common.settings import Settings
from phase3_production import create_app
from phase3_production.cache import LocalCopies
from phase3_production.fastpath import FastPath
from phase3_production.metrics import Metrics
from taskman.redis_server import EmbeddedRedis
from tests.conftest import submit
from tests.processes import drain_queue

AUTH = {"Authorization": "Basic " + base64.b64encode(b"admin:secret").decode()}


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        queue_name=f"c{uuid.uuid4().hex[:8]}",  # no session worker takes these
        retry_backoff=[0],
        rate_limit_submit="100000/second",
        rate_limit_read="100000/second",
        dashboard_password="secret",
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_a_finished_task_is_served_from_the_cache(
    client: TestClient, settings: Settings
) -> None:
    task = submit(client, "echo", value="cached")
    queued = client.get(f"/tasks/{task['id']}")
    assert queued.headers["x-cache"] == "MISS"  # unfinished: never cached
    assert not redis.Redis.from_url(str(settings.redis_url)).exists(
        f"taskman:cache:{task['id']}"
    )
    drain_queue(settings, phase=3)
    first = client.get(f"/tasks/{task['id']}")
    second = client.get(f"/tasks/{task['id']}")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.json() == second.json()
    assert second.json()["result"] == "cached"


def test_an_unfinished_task_is_never_cached(
    client: TestClient, settings: Settings
) -> None:
    task = submit(client, "echo", value=1)
    for _ in range(3):
        assert client.get(f"/tasks/{task['id']}").headers["x-cache"] == "MISS"
    drain_queue(settings, phase=3)


def test_a_cache_entry_never_outlives_rqs_result_ttl(redis_url: str) -> None:
    settings = Settings(
        redis_url=redis_url,
        queue_name=f"c{uuid.uuid4().hex[:8]}",
        retention_seconds=5,
        result_cache_ttl=300,
    )
    with TestClient(create_app(settings)) as client:
        task = submit(client, "echo", value=1)
        drain_queue(settings, phase=3)
        client.get(f"/tasks/{task['id']}")
    ttl = redis.Redis.from_url(redis_url).ttl(f"taskman:cache:{task['id']}")
    assert 0 < ttl <= 5


def test_a_requeue_by_stock_rq_that_fails_again_is_not_served_stale(
    client: TestClient, settings: Settings
) -> None:
    """A requeue that ends in the same status (failed, then failed again) must show
    its new attempt: the cache may not tell the two failures apart by status."""
    task = submit(client, "fail", message="again", max_retries=0)
    drain_queue(settings, phase=3)
    first = client.get(f"/tasks/{task['id']}").json()
    assert client.get(f"/tasks/{task['id']}").headers["x-cache"] == "HIT"
    rq = str(Path(sys.executable).parent / "rq")
    subprocess.run(
        [
            *(rq, "requeue", "--all", "--queue", settings.queue_name),
            *("--url", str(settings.redis_url), "-S", "rq.serializers.JSONSerializer"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    drain_queue(settings, phase=3)
    time.sleep(1.1)  # past the in-process layer's second
    again = client.get(f"/tasks/{task['id']}").json()
    assert (first["attempts"], again["attempts"]) == (1, 2), again
    assert again["finished_at"] > first["finished_at"]


def test_a_dashboard_requeue_shows_within_two_seconds(
    client: TestClient, settings: Settings
) -> None:
    task = submit(client, "fail", message="first", max_retries=0)
    drain_queue(settings, phase=3)
    assert client.get(f"/tasks/{task['id']}").json()["status"] == "failed"
    assert client.get(f"/tasks/{task['id']}").headers["x-cache"] == "HIT"
    # rq-dashboard's own requeue route writes to Redis behind the API's back.
    requeue = client.post(f"/dashboard/job/{task['id']}/requeue", headers=AUTH)
    assert requeue.status_code == 200, requeue.text
    requeued_at = time.monotonic()
    while (status := client.get(f"/tasks/{task['id']}").json()["status"]) == "failed":
        assert time.monotonic() - requeued_at < 2, "stale cache after a requeue"
        time.sleep(0.05)
    assert status == "retrying"  # back in the queue, after one failed attempt
    drain_queue(settings, phase=3)


def test_delete_shows_canceled_at_once(client: TestClient) -> None:
    task = submit(client, "echo", value=1)
    client.get(f"/tasks/{task['id']}")
    assert client.delete(f"/tasks/{task['id']}").json()["status"] == "canceled"
    assert client.get(f"/tasks/{task['id']}").json()["status"] == "canceled"
    # Canceled is final: from now on the cache answers, and says canceled.
    again = client.get(f"/tasks/{task['id']}")
    assert (again.headers["x-cache"], again.json()["status"]) == ("HIT", "canceled")


def test_etag_and_304_let_a_poller_skip_the_body(
    client: TestClient, settings: Settings
) -> None:
    task = submit(client, "echo", value="body")
    drain_queue(settings, phase=3)
    first = client.get(f"/tasks/{task['id']}")
    etag = first.headers["etag"]
    again = client.get(f"/tasks/{task['id']}", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    other = client.get(f"/tasks/{task['id']}", headers={"If-None-Match": '"nope"'})
    assert other.status_code == 200 and other.json()["result"] == "body"


def test_if_none_match_compares_weakly_takes_lists_and_star_as_rfc_9110_says(
    client: TestClient, settings: Settings
) -> None:
    task = submit(client, "echo", value="body")
    drain_queue(settings, phase=3)
    path = f"/tasks/{task['id']}"
    etag = client.get(path).headers["etag"]
    matching = [
        "*",
        f"W/{etag}",
        f'"a", {etag}',
        f'W/"a",W/{etag}',
        f'"with,comma", {etag} ',
    ]
    for value in matching:
        answer = client.get(path, headers={"If-None-Match": value})
        assert answer.status_code == 304, value
        assert answer.headers["etag"] == etag
    # Two header lines are one list.
    lines = [("If-None-Match", '"a"'), ("If-None-Match", etag)]
    assert client.get(path, headers=httpx.Headers(lines)).status_code == 304
    for value in ['"a", "b"', etag.strip('"'), f'{etag[:-2]}x"', "", "W/"]:
        answer = client.get(path, headers={"If-None-Match": value})
        assert answer.status_code == 200, value
    # A task that is not there has no representation for "*" to match.
    missing = client.get("/tasks/" + "0" * 32, headers={"If-None-Match": "*"})
    assert missing.status_code == 404


def test_many_pollers_of_a_just_finished_task_cause_one_backend_read(
    tmp_path: Path,
) -> None:
    with EmbeddedRedis(tmp_path / "redis") as url:
        settings = Settings(
            redis_url=url,
            retry_backoff=[0],
            rate_limit_submit="100000/second",
            rate_limit_read="100000/second",
        )
        app = create_app(settings)
        with TestClient(app) as client:
            task = submit(client, "echo", value="hot")
        drain_queue(settings, phase=3)
        server = redis.Redis.from_url(url)
        server.config_resetstat()

        async def poll_together() -> list[httpx.Response]:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://test"
                ) as api:
                    return await asyncio.gather(
                        *(api.get(f"/tasks/{task['id']}") for _ in range(50))
                    )

        responses = asyncio.run(poll_together())
        assert {r.json()["status"] for r in responses} == {"succeeded"}
        assert sum(r.headers["x-cache"] == "MISS" for r in responses) >= 1
        # RQBackend.get is one HGETALL of the job's hash: it ran once for 50 GETs.
        stats = server.info("commandstats")
        assert stats["cmdstat_hgetall"]["calls"] == 1, stats.get("cmdstat_hgetall")


# --- the fast path (fastpath.py): a hit answered in front of FastAPI


def without_ratelimit_counts(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    """The raw header lines, the rate limit's changing counts left out."""
    changing = (b"ratelimit", b"x-ratelimit-remaining", b"x-ratelimit-reset")
    return [(n, v) for n, v in response.headers.raw if n.lower() not in changing]


def test_the_fast_path_answers_a_hit_byte_for_byte_as_the_app_does(
    client: TestClient, settings: Settings
) -> None:
    task = submit(client, "echo", value="fast")
    drain_queue(settings, phase=3)
    path = f"/tasks/{task['id']}"
    assert client.get(path).headers["x-cache"] == "MISS"  # stored, and copied here
    fast = client.get(path)  # the copy is fresh: answered in front of the app
    time.sleep(1.1)  # past the copy's second: the app answers, from Redis
    by_app = client.get(path)
    assert (fast.status_code, by_app.status_code) == (200, 200)
    assert fast.content == by_app.content
    assert without_ratelimit_counts(fast) == without_ratelimit_counts(by_app)
    assert fast.headers["x-cache"] == "HIT" and "ratelimit" in fast.headers
    etag = {"If-None-Match": fast.headers["etag"]}
    fast_304 = client.get(path, headers=etag)  # fresh again: the fast path
    time.sleep(1.1)
    app_304 = client.get(path, headers=etag)
    assert (fast_304.status_code, app_304.status_code) == (304, 304)
    assert fast_304.content == app_304.content == b""
    assert without_ratelimit_counts(fast_304) == without_ratelimit_counts(app_304)
    # The metrics cannot tell the paths apart either: one route template.
    scrape = client.get("/metrics").text
    line = (
        'taskman_http_requests_total{method="GET",route="/tasks/{task_id}",'
        'status="200"} 3.0'
    )
    assert line in scrape
    assert "taskman_cache_hits_total 4.0" in scrape, scrape


def test_the_fast_path_leaves_everything_else_to_the_app() -> None:
    copies = LocalCopies()
    task = Task.model_validate(
        {
            "id": "a" * 32,
            "type": "echo",
            "status": "succeeded",
            "payload": {"value": 1},
            "result": 1,
            "attempts": 1,
            "max_retries": 0,
            "created_at": "2026-01-01T00:00:00Z",
            "finished_at": "2026-01-01T00:00:01Z",
        }
    )
    copies.remember(task)
    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(f"{scope['method']} {scope['path']}?{scope['query_string']!r}")

    fast = FastPath(app, copies=copies, metrics=Metrics())
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    def request(method: str, path: str, query: bytes = b"") -> None:
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "query_string": query,
            "headers": [],
        }
        asyncio.run(fast(scope, receive, send))

    request("GET", f"/tasks/{task.id}")
    assert (
        sent[0]["status"] == 200 and sent[1]["body"] == task.model_dump_json().encode()
    )
    for method, path, query in [
        ("GET", f"/tasks/{task.id}", b"wait=1"),
        ("HEAD", f"/tasks/{task.id}", b""),
        ("DELETE", f"/tasks/{task.id}", b""),
        ("GET", f"/tasks/{task.id}/events", b""),
        ("GET", f"/tasks/{'b' * 32}", b""),  # no copy of it here
        ("GET", f"/tasks/{task.id.upper()}", b""),
    ]:
        request(method, path, query)
    copies.forget(task.id)
    request("GET", f"/tasks/{task.id}")
    assert len(reached) == 7 and len(sent) == 2, reached
