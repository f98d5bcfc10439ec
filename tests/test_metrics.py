"""Phase 3's GET /metrics: Prometheus text whose counters move with the requests,
tasks, refusals and cache reads they count."""

import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from common.settings import Settings
from phase1_inprocess import create_app
from phase3_production.dashboard import mount_dashboard
from phase3_production.metrics import Metrics, install_metrics
from phase3_production.ratelimit import RateLimit

UNKNOWN_TASK = "/tasks/" + "0" * 32


def value(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition, or fail listing what there is."""
    samples = [
        s for family in text_string_to_metric_families(text) for s in family.samples
    ]
    for sample in samples:
        if sample.name == name and sample.labels == labels:
            return float(sample.value)
    names = sorted({s.name for s in samples})
    raise AssertionError(f"no sample {name}{labels}; names: {names}")


def sample_labels(text: str, name: str) -> list[dict[str, str]]:
    return [
        s.labels
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def instrumented_app(redis_url: str, **values: Any) -> tuple[FastAPI, Metrics]:
    """Phase 1 with the rate limiter and, outermost, the metrics, as phase 3
    wires them."""
    settings = Settings(redis_url=redis_url, cpu_workers=1, io_concurrency=2, **values)
    app = create_app(settings)
    metrics = Metrics()
    app.add_middleware(
        RateLimit,
        settings=settings,
        key_prefix=f"test:{uuid.uuid4().hex}",
        on_limited=metrics.count_rate_limited,
    )
    install_metrics(app, metrics)
    return app, metrics


@pytest.fixture
def app_and_metrics(redis_url: str) -> tuple[FastAPI, Metrics]:
    return instrumented_app(redis_url, rate_limit_read="3/minute")


@pytest.fixture
def client(app_and_metrics: tuple[FastAPI, Metrics]) -> Iterator[TestClient]:
    with TestClient(app_and_metrics[0]) as test_client:
        yield test_client


def scrape(client: TestClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    text: str = response.text
    return text


def test_metrics_are_served_in_prometheus_text_format(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    for name in (
        "taskman_http_requests_total",
        "taskman_http_request_duration_seconds",
        "taskman_tasks_total",
        "taskman_queue_depth",
        "taskman_rate_limited_requests_total",
        "taskman_cache_hits_total",
        "taskman_cache_misses_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    # Known series are there from the start, at 0.
    assert value(text, "taskman_tasks_total", event="canceled", type="primes") == 0


def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(
    client: TestClient,
) -> None:
    response = client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_requests_are_counted_by_route_template_and_status(client: TestClient) -> None:
    for i in range(3):
        assert client.get(f"/tasks/{i:032x}").status_code == 404
    client.get("/health")
    text = scrape(client)
    labels = {"method": "GET", "route": "/tasks/{task_id}", "status": "404"}
    assert value(text, "taskman_http_requests_total", **labels) == 3
    assert value(text, "taskman_http_request_duration_seconds_count", **labels) == 3
    assert value(text, "taskman_http_request_duration_seconds_sum", **labels) > 0
    health = {"method": "GET", "route": "/health", "status": "200"}
    assert value(text, "taskman_http_requests_total", **health) == 1
    # No raw path ever becomes a label.
    routes = {
        labels["route"] for labels in sample_labels(text, "taskman_http_requests_total")
    }
    assert not any("0000" in route for route in routes), routes


def test_unknown_paths_and_methods_share_one_label_each(client: TestClient) -> None:
    for i in range(3):
        client.get(f"/no/such/path/{i}")
        client.request("BREW", "/health")
    text = scrape(client)
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert value(text, "taskman_http_requests_total", **unmatched) == 3
    brewed = {"method": "other", "route": "/health", "status": "405"}
    assert value(text, "taskman_http_requests_total", **brewed) == 3


def test_rate_limited_requests_are_counted(client: TestClient) -> None:
    statuses = [client.get(UNKNOWN_TASK).status_code for _ in range(5)]
    assert statuses == [404, 404, 404, 429, 429]
    text = scrape(client)
    assert value(text, "taskman_rate_limited_requests_total", limit="read") == 2
    assert value(text, "taskman_rate_limited_requests_total", limit="submit") == 0
    # The refusals are requests too, under their route.
    refused = {"method": "GET", "route": "/tasks/{task_id}", "status": "429"}
    assert value(text, "taskman_http_requests_total", **refused) == 2


def test_metrics_are_never_rate_limited(client: TestClient) -> None:
    assert all(client.get("/metrics").status_code == 200 for _ in range(10))


def test_task_and_cache_counters_move_when_the_backend_counts(
    client: TestClient, app_and_metrics: tuple[FastAPI, Metrics]
) -> None:
    metrics = app_and_metrics[1]
    metrics.count_task("submitted", "echo")
    metrics.count_task("submitted", "echo")
    metrics.count_task("canceled", "sleep")
    metrics.count_cache(hit=True)
    metrics.count_cache(hit=False)
    metrics.count_cache(hit=False)
    text = scrape(client)
    assert value(text, "taskman_tasks_total", event="submitted", type="echo") == 2
    assert value(text, "taskman_tasks_total", event="canceled", type="sleep") == 1
    assert value(text, "taskman_tasks_total", event="canceled", type="echo") == 0
    assert value(text, "taskman_cache_hits_total") == 1
    assert value(text, "taskman_cache_misses_total") == 2


def test_queue_depth_is_read_at_scrape_time(
    client: TestClient, app_and_metrics: tuple[FastAPI, Metrics]
) -> None:
    metrics = app_and_metrics[1]
    assert math.isnan(value(scrape(client), "taskman_queue_depth"))  # no source yet
    depth = iter([7, 3])
    metrics.track_queue_depth(lambda: next(depth))
    assert value(scrape(client), "taskman_queue_depth") == 7
    assert value(scrape(client), "taskman_queue_depth") == 3


def test_a_failing_queue_depth_source_does_not_break_the_scrape(
    client: TestClient, app_and_metrics: tuple[FastAPI, Metrics]
) -> None:
    def redis_is_down() -> float:
        raise ConnectionError("Redis is down")

    app_and_metrics[1].track_queue_depth(redis_is_down)
    assert math.isnan(value(scrape(client), "taskman_queue_depth"))


def test_two_apps_in_one_process_keep_separate_counts(redis_url: str) -> None:
    first, _ = instrumented_app(redis_url)
    second, _ = instrumented_app(redis_url)
    with TestClient(first) as one, TestClient(second) as other:
        for _ in range(2):
            one.get("/health")
        other.get("/health")
        health = {"method": "GET", "route": "/health", "status": "200"}
        assert value(scrape(one), "taskman_http_requests_total", **health) == 2
        assert value(scrape(other), "taskman_http_requests_total", **health) == 1


def test_mounted_apps_are_counted_under_their_mount(redis_url: str) -> None:
    app, _ = instrumented_app(redis_url)
    settings = Settings(redis_url=redis_url, dashboard_password="s3cret")
    mount_dashboard(app, settings)
    with TestClient(app) as client:
        for path in ("/dashboard", "/dashboard/", "/dashboard/0/view/jobs"):
            assert client.get(path, follow_redirects=False).status_code == 401
        text = scrape(client)
    denied = {"method": "GET", "route": "/dashboard", "status": "401"}
    assert value(text, "taskman_http_requests_total", **denied) == 3


def test_phase3_metrics_move_as_real_tasks_run(redis_url: str) -> None:
    from phase3_production import create_app
    from tests.processes import drain_queue

    settings = Settings(
        redis_url=redis_url,
        queue_name=f"m{uuid.uuid4().hex[:8]}",
        retry_backoff=[0],
        rate_limit_submit="1000/second",
    )
    with TestClient(create_app(settings)) as client:
        before = scrape(client)
        ids = [
            client.post("/tasks", json=body).json()["id"]
            for body in (
                {"type": "echo", "payload": {"value": 1}},
                {"type": "flaky", "payload": {"fail_times": 1}},
                {"type": "fail", "payload": {"message": "no"}, "max_retries": 0},
            )
        ]
        assert value(scrape(client), "taskman_queue_depth") == 3
        drain_queue(settings, phase=3)
        for task_id in ids:
            client.get(f"/tasks/{task_id}")
            client.get(f"/tasks/{task_id}")
        after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        # Workers count in Redis, shared by the whole session: compare, and a
        # series that did not exist yet counts from 0.
        def read(text: str) -> float:
            try:
                return value(text, name, **labels)
            except AssertionError:
                return 0.0

        return read(after) - read(before)

    assert value(after, "taskman_tasks_total", event="submitted", type="echo") == 1
    for event, task_type in [
        ("succeeded", "echo"),
        ("retried", "flaky"),
        ("succeeded", "flaky"),
        ("failed", "fail"),
    ]:
        assert moved("taskman_task_outcomes_total", event=event, type=task_type) >= 1
    assert value(after, "taskman_queue_depth") == 0
    assert value(after, "taskman_cache_hits_total") >= 3
    assert value(after, "taskman_cache_misses_total") >= 3
