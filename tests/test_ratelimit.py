"""Phase 3's rate limits, against a real Redis: exact under concurrency, honest
headers, proxies believed only when trusted, and Redis outages that never 500."""

import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from common.settings import Settings
from phase1_inprocess import create_app
from phase3_production.ratelimit import RateLimit, storage_uri
from taskman.redis_server import EmbeddedRedis, free_port
from tests.processes import stop, wait_http

STRATEGIES = ["moving-window", "fixed-window", "sliding-window-counter"]
UNKNOWN_TASK = "/tasks/" + "0" * 32  # a valid id that no task has: 404, quickly


def limited_app(
    redis_url: str,
    on_limited: Any = None,
    key_prefix: str | None = None,
    **values: Any,
) -> FastAPI:
    """Phase 1 plus the rate limiter, with keys of its own (tests never share a
    count)."""
    settings = Settings(redis_url=redis_url, cpu_workers=1, io_concurrency=2, **values)
    app = create_app(settings)
    app.add_middleware(
        RateLimit,
        settings=settings,
        key_prefix=key_prefix or f"test:{uuid.uuid4().hex}",
        on_limited=on_limited,
    )
    return app


def create_limited_app() -> FastAPI:
    """The app of the two-process test, configured from the environment; serve
    with ``uvicorn --factory tests.test_ratelimit:create_limited_app``."""
    settings = Settings()
    assert settings.redis_url
    return limited_app(
        settings.redis_url,
        key_prefix=os.environ["TASKMAN_TEST_RATELIMIT_PREFIX"],
        rate_limit_read=settings.rate_limit_read,
    )


def policies(response: httpx.Response) -> dict[str, tuple[int, int]]:
    """RateLimit-Policy as {name: (quota, window)}."""
    found = re.findall(
        r'"([^"]+)";q=(\d+);w=(\d+)', response.headers["ratelimit-policy"]
    )
    return {name: (int(q), int(w)) for name, q, w in found}


def reported(response: httpx.Response) -> tuple[str, int, int]:
    """RateLimit as (policy name, remaining, reset in seconds)."""
    match = re.fullmatch(r'"([^"]+)";r=(\d+);t=(\d+)', response.headers["ratelimit"])
    assert match, response.headers["ratelimit"]
    return match[1], int(match[2]), int(match[3])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_limit_is_exact_at_its_boundary_with_50_concurrent_clients(
    redis_url: str, strategy: str
) -> None:
    app = limited_app(
        redis_url, rate_limit_read="37/minute", rate_limit_strategy=strategy
    )
    with TestClient(app) as client:
        start = threading.Barrier(50)

        def two_requests(_: int) -> list[int]:
            start.wait()  # all 50 at once
            return [client.get(UNKNOWN_TASK).status_code for _ in range(2)]

        with ThreadPoolExecutor(50) as pool:
            statuses = [s for pair in pool.map(two_requests, range(50)) for s in pair]
    assert Counter(statuses) == {404: 37, 429: 63}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_limited_response_carries_consistent_ratelimit_headers(
    redis_url: str, strategy: str
) -> None:
    app = limited_app(
        redis_url, rate_limit_read="3/minute;10/hour", rate_limit_strategy=strategy
    )
    with TestClient(app) as client:
        for sent in range(1, 4):
            response = client.get(UNKNOWN_TASK)
            assert response.status_code == 404
            assert policies(response) == {"read-60s": (3, 60), "read-3600s": (10, 3600)}
            name, remaining, reset = reported(response)
            # The most restrictive policy: the one with the least left.
            assert (name, remaining) == ("read-60s", 3 - sent)
            assert 1 <= reset <= 60
            assert response.headers["x-ratelimit-limit"] == "3"
            assert response.headers["x-ratelimit-remaining"] == str(remaining)
            reset_at = int(response.headers["x-ratelimit-reset"])
            assert abs(reset_at - time.time() - reset) <= 2
        refused = client.get(UNKNOWN_TASK)
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/json"
    assert "rate limit exceeded" in refused.json()["detail"]
    name, remaining, reset = reported(refused)
    assert (name, remaining) == ("read-60s", 0)
    assert refused.headers["retry-after"] == str(reset)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining"] == "0"


def test_submit_and_read_have_separate_limits(redis_url: str) -> None:
    app = limited_app(
        redis_url, rate_limit_submit="2/minute", rate_limit_read="3/minute"
    )
    body = {"type": "echo", "payload": {"value": 1}}
    with TestClient(app) as client:
        submitted = [client.post("/tasks", json=body) for _ in range(3)]
        assert [r.status_code for r in submitted] == [202, 202, 429]
        assert reported(submitted[0])[0] == "submit-60s"
        # Spent submissions leave reading alone; a cancel counts as a read.
        task_id = submitted[0].json()["id"]
        read = client.get(f"/tasks/{task_id}")
        canceled = client.delete(f"/tasks/{task_id}")
        statuses = [client.get(f"/tasks/{task_id}").status_code for _ in range(2)]
    assert read.status_code == 200
    assert reported(read)[0] == "read-60s"
    assert canceled.status_code in (200, 409)  # 409: the echo was done already
    assert statuses == [200, 429]


def test_health_metrics_docs_and_openapi_are_never_limited(redis_url: str) -> None:
    app = limited_app(
        redis_url, rate_limit_submit="1/minute", rate_limit_read="1/minute"
    )
    with TestClient(app) as client:
        for _ in range(5):
            for path in (
                "/health",
                "/docs",
                "/openapi.json",
                "/dashboard/",
                "/metrics",
            ):
                response = client.get(path)
                assert response.status_code != 429, path
                assert "ratelimit" not in response.headers, path


@pytest.mark.parametrize("peer", ["203.0.113.5", "127.0.0.1"])
def test_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    redis_url: str, peer: str
) -> None:
    # No trusted proxies (the default): not even loopback is believed.
    app = limited_app(redis_url, rate_limit_read="2/minute")
    with TestClient(app, client=(peer, 4711)) as client:
        statuses = [
            client.get(
                UNKNOWN_TASK, headers={"X-Forwarded-For": f"198.51.100.{i}"}
            ).status_code
            for i in range(4)
        ]
        no_header = client.get(UNKNOWN_TASK).status_code
    assert statuses == [404, 404, 429, 429]
    assert no_header == 429


def test_forwarded_for_from_a_trusted_proxy_names_the_client(redis_url: str) -> None:
    app = limited_app(
        redis_url, rate_limit_read="2/minute", trusted_proxies=["10.0.0.0/8"]
    )

    def status(client: TestClient, forwarded_for: str) -> int:
        response = client.get(UNKNOWN_TASK, headers={"X-Forwarded-For": forwarded_for})
        code: int = response.status_code
        return code

    with TestClient(app, client=("10.0.0.1", 4711)) as proxy:
        assert status(proxy, "198.51.100.7") == 404
        # Through a second proxy of ours: still the same client.
        assert status(proxy, "198.51.100.7, 10.0.0.9") == 404
        assert status(proxy, "198.51.100.7") == 429
        # What the client wrote itself (left of what our proxy appended) is ignored.
        assert status(proxy, "192.0.2.1, 198.51.100.7") == 429
        # Another client behind the same proxy has a count of its own.
        assert status(proxy, "198.51.100.8") == 404


def test_ipv6_clients_are_counted_per_64_network(redis_url: str) -> None:
    app = limited_app(
        redis_url, rate_limit_read="2/minute", trusted_proxies=["10.0.0.1"]
    )
    with TestClient(app, client=("10.0.0.1", 4711)) as proxy:
        statuses = [
            proxy.get(
                UNKNOWN_TASK, headers={"X-Forwarded-For": f"2001:db8:1:2::{i}"}
            ).status_code
            for i in range(1, 4)
        ]
    assert statuses == [404, 404, 429]


def test_limited_requests_are_reported_to_the_on_limited_hook(redis_url: str) -> None:
    seen: list[str] = []
    app = limited_app(
        redis_url,
        on_limited=seen.append,
        rate_limit_submit="1/minute",
        rate_limit_read="1/minute",
    )
    body = {"type": "echo", "payload": {"value": 1}}
    with TestClient(app) as client:
        for _ in range(3):
            client.get(UNKNOWN_TASK)
            client.post("/tasks", json=body)
    assert sorted(seen) == ["read", "read", "submit", "submit"]


def test_redis_down_with_fail_open_lets_requests_through_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    app = limited_app(nowhere, rate_limit_read="1/minute", rate_limit_fail_mode="open")
    with caplog.at_level(logging.WARNING, logger="taskman"), TestClient(app) as client:
        responses = [client.get(UNKNOWN_TASK) for _ in range(5)]
    assert [r.status_code for r in responses] == [404] * 5
    assert "ratelimit" not in responses[0].headers
    warnings = [r for r in caplog.records if "rate limiting is off" in r.getMessage()]
    assert len(warnings) == 1


def test_limits_come_back_with_redis_under_steady_requests(tmp_path: Path) -> None:
    # After a failure the limiter leaves Redis alone for a second; requests that
    # keep coming within that second must not keep renewing it (they did: under
    # load, a Redis blip or a failover turned rate limiting off for good).
    server = EmbeddedRedis(tmp_path)
    app = limited_app(server.url, rate_limit_read="1000/minute")
    with TestClient(app) as client:
        assert "ratelimit" not in client.get(UNKNOWN_TASK).headers  # not up yet
        server.start()
        try:
            deadline = time.monotonic() + 5
            while "ratelimit" not in client.get(UNKNOWN_TASK).headers:
                assert time.monotonic() < deadline, "rate limiting never came back"
                time.sleep(0.1)  # steadier than the one-second pause
        finally:
            server.stop()


def test_redis_down_with_fail_closed_answers_503_with_retry_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    app = limited_app(nowhere, rate_limit_fail_mode="closed")
    with caplog.at_level(logging.WARNING, logger="taskman"), TestClient(app) as client:
        refused = client.get(UNKNOWN_TASK)
        health = client.get("/health")
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/json"
    assert "detail" in refused.json()
    assert int(refused.headers["retry-after"]) >= 1
    assert health.status_code == 200  # exempt routes do not need the limiter
    assert any("fail-closed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("url", "uri"),
    [
        ("redis://:pw@host:6379/2", "async+redis://:pw@host:6379/2"),
        ("rediss://user:pw@host:6380/0", "async+rediss://user:pw@host:6380/0"),
        ("unix:///run/redis.sock?db=1", "async+redis+unix:///run/redis.sock?db=1"),
    ],
)
def test_redis_urls_become_limits_storage_uris_with_their_credentials(
    url: str, uri: str
) -> None:
    assert storage_uri(url) == uri


def test_a_password_in_the_redis_url_is_used(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as url:
        redis.Redis.from_url(url).config_set("requirepass", "s3cret")
        with_password = url.replace("redis://", "redis://default:s3cret@")
        good = limited_app(
            with_password, rate_limit_read="1/minute", rate_limit_fail_mode="closed"
        )
        bad = limited_app(
            url, rate_limit_read="1/minute", rate_limit_fail_mode="closed"
        )
        with TestClient(good) as client:
            assert [client.get(UNKNOWN_TASK).status_code for _ in range(2)] == [
                404,
                429,
            ]
        with TestClient(bad) as client:
            assert client.get(UNKNOWN_TASK).status_code == 503


@pytest.fixture
def two_api_processes(redis_url: str, tmp_path: Path) -> Iterator[list[str]]:
    env = {
        **os.environ,
        "TASKMAN_REDIS_URL": redis_url,
        "TASKMAN_RATE_LIMIT_READ": "30/minute",
        "TASKMAN_TEST_RATELIMIT_PREFIX": f"test:{uuid.uuid4().hex}",
    }
    ports = [free_port(), free_port()]
    servers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "tests.test_ratelimit:create_limited_app",
                "--port",
                str(port),
                "--no-proxy-headers",
            ],
            cwd=Path(__file__).parent.parent,
            env=env,
            stdout=(tmp_path / f"{port}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for port in ports
    ]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, server in zip(urls, servers, strict=True):
            wait_http(f"{url}/health", process=server)
        yield urls
    finally:
        for server in servers:
            stop(server, timeout=30)


def test_two_api_processes_share_one_limit(two_api_processes: list[str]) -> None:
    start = threading.Barrier(20)

    def three_requests(i: int) -> list[int]:
        base = two_api_processes[i % 2]
        with httpx.Client(base_url=base, timeout=10) as client:
            start.wait()
            return [client.get(UNKNOWN_TASK).status_code for _ in range(3)]

    with ThreadPoolExecutor(20) as pool:
        statuses = [s for trio in pool.map(three_requests, range(20)) for s in trio]
    assert Counter(statuses) == {404: 30, 429: 30}


def test_a_redis_that_forgot_its_scripts_still_limits_exactly(redis_url: str) -> None:
    # The one-round-trip path calls limits' scripts by hash; after a Redis restart
    # they are gone (NOSCRIPT) and the request takes the path that reloads them.
    app = limited_app(redis_url, rate_limit_read="3/minute")
    with TestClient(app) as client:
        assert client.get(UNKNOWN_TASK).status_code == 404
        redis.Redis.from_url(redis_url).script_flush()
        statuses = [client.get(UNKNOWN_TASK).status_code for _ in range(3)]
    assert statuses == [404, 404, 429]


def test_local_allowances_of_two_apps_never_admit_more_than_the_limit(
    redis_url: str,
) -> None:
    # 1000/minute: each process reserves blocks of 10 (allowance.py). Together
    # they admit at most the limit, and at most 9 fewer per process.
    prefix = f"test:{uuid.uuid4().hex}"
    apps = [
        limited_app(redis_url, key_prefix=prefix, rate_limit_read="1000/minute")
        for _ in range(2)
    ]
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        clients = [first, second]
        start = threading.Barrier(40)

        def requests(i: int) -> list[int]:
            start.wait()
            return [
                clients[(i + n) % 2].get(UNKNOWN_TASK).status_code for n in range(30)
            ]

        with ThreadPoolExecutor(40) as pool:
            statuses = Counter(
                s for some in pool.map(requests, range(40)) for s in some
            )
    assert set(statuses) == {404, 429}
    assert 1000 - 2 * 9 <= statuses[404] <= 1000


def test_an_unspent_block_is_the_stated_bound_and_is_spent_by_its_holder(
    redis_url: str,
) -> None:
    # 500/minute: blocks of 5. The first app takes one block and spends 1 of it;
    # the second is refused 4 short of the limit (the bound: block - 1), and the
    # first may still spend those 4: the limit, exactly.
    prefix = f"test:{uuid.uuid4().hex}"
    apps = [
        limited_app(redis_url, key_prefix=prefix, rate_limit_read="500/minute")
        for _ in range(2)
    ]
    with TestClient(apps[0]) as holder, TestClient(apps[1]) as other:
        assert holder.get(UNKNOWN_TASK).status_code == 404
        admitted = 0
        while (response := other.get(UNKNOWN_TASK)).status_code == 404:
            admitted += 1
        assert response.status_code == 429
        assert admitted == 500 - 5
        rest = [holder.get(UNKNOWN_TASK).status_code for _ in range(5)]
    assert rest == [404] * 4 + [429]
