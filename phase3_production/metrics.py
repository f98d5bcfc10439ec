"""Prometheus metrics at GET /metrics: requests per route template, task outcomes,
queue depth, rate-limit refusals and cache hits, in a registry of the app's own.
"""

import collections
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.backend import TaskBackend
from common.listing import TaskQuery
from common.models import Task, TaskCreate, TaskPage
from common.tasks import TASKS
from phase3_production.cache import cache_outcome

log = logging.getLogger("taskman")

# Seen by the API itself. Succeeded, failed and retried happen in the workers:
# see taskman_task_outcomes (_Outcomes below).
TaskEvent = Literal["submitted", "canceled"]

# Label values come from a fixed set: a client making up methods or paths must not
# be able to make up new time series.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
UNMATCHED = "<unmatched>"
# The scope key under which whoever answers a request in front of the router
# (fastpath.py) names the route template it answered for.
ROUTE_TEMPLATE = "taskman.route_template"


class Metrics:
    """Every metric of one app, in a registry of its own (not prometheus_client's
    global one), so that several apps in one process keep separate counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("method", "route", "status")
        self.requests = Counter(
            "taskman_http_requests",
            "HTTP requests answered, by route template and status",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "taskman_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and status",
            labels,
            registry=self.registry,
        )
        self.tasks = Counter(
            "taskman_tasks",
            "Tasks submitted and canceled through this API process, by task type",
            ("event", "type"),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "taskman_queue_depth",
            "Tasks waiting in the queue, read when scraped",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "taskman_rate_limited_requests",
            "Requests refused with 429, by limit (submit or read)",
            ("limit",),
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "taskman_cache_hits",
            "Task reads answered from the result cache",
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "taskman_cache_misses",
            "Task reads the result cache could not answer",
            registry=self.registry,
        )
        # Known series start at 0, so that rate() sees the first event as an
        # increase rather than as a new series.
        for event in get_args(TaskEvent):
            for task_type in TASKS:
                self.tasks.labels(event, task_type)
        for limit in ("submit", "read"):
            self.rate_limited.labels(limit)
        self._queue_depth_source: Callable[[], float] | None = None
        self.queue_depth.set_function(self._read_queue_depth)
        self._outcomes_source: Callable[[], dict[str, float]] | None = None
        self.registry.register(_Outcomes(self))

    def count_task(self, event: TaskEvent, task_type: str, count: int = 1) -> None:
        """``count`` task events: CountedBackend calls this as it learns of them."""
        self.tasks.labels(event, task_type).inc(count)

    def count_rate_limited(self, limit: str) -> None:
        """The ``on_limited`` hook of :class:`~phase3_production.ratelimit.RateLimit`."""
        self.rate_limited.labels(limit).inc()

    def count_cache(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    def track_queue_depth(self, source: Callable[[], float]) -> None:
        """Read the queue depth from ``source`` at each scrape.

        It runs in a worker thread, so it may block (RQ's ``Queue.count`` does).
        """
        self._queue_depth_source = source

    def track_outcomes(self, source: Callable[[], dict[str, float]]) -> None:
        """Read the workers' counts ("succeeded:echo" -> n) from ``source`` at each
        scrape: tasks succeed and fail in worker processes, not in this one."""
        self._outcomes_source = source

    def _read_queue_depth(self) -> float:
        if self._queue_depth_source is None:
            return math.nan
        try:
            return self._queue_depth_source()
        except Exception as error:  # Redis down: the scrape still answers
            log.warning("queue depth unknown for /metrics: %s", error)
            return math.nan

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format the scraper asked for, and its media type."""
        encoder, media_type = choose_encoder(accept)
        return encoder(self.registry), media_type


class CountedBackend:
    """Any backend, its task events and cache outcomes counted in ``metrics``."""

    def __init__(self, inner: TaskBackend, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def submit(
        self, request: TaskCreate, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        task, created = await self._inner.submit(request, idempotency_key)
        if created:
            self._metrics.count_task("submitted", task.type)
        return task, created

    async def submit_many(
        self, requests: list[TaskCreate], idempotency_key: str | None = None
    ) -> tuple[list[Task], bool]:
        """Each task of a new batch counts in taskman_tasks_total, as if POSTed
        alone; an idempotent repeat counts none."""
        tasks, created = await self._inner.submit_many(requests, idempotency_key)
        if created:  # one count a type, not a task: labels() costs ~3 µs a call
            for task_type, count in collections.Counter(t.type for t in tasks).items():
                self._metrics.count_task("submitted", task_type, count)
        return tasks, created

    async def get(self, task_id: str) -> Task | None:
        cache_outcome.set(None)
        task = await self._inner.get(task_id)
        outcome = cache_outcome.get()  # set by the cache, if there is one
        if outcome is not None:
            self._metrics.count_cache(outcome == "HIT")
        return task

    async def wait(
        self, task_id: str, timeout: float, seen: Task | None = None
    ) -> Task | None:
        return await self._inner.wait(task_id, timeout, seen)

    async def list(self, query: TaskQuery) -> TaskPage:
        return await self._inner.list(query)

    async def cancel(self, task_id: str) -> Task | None:
        task = await self._inner.cancel(task_id)
        if task is not None:
            self._metrics.count_task("canceled", task.type)
        return task

    async def health(self) -> dict[str, Any]:
        return await self._inner.health()

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Outcomes(Collector):
    """taskman_task_outcomes_total{event, type}, counted by every worker in Redis."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "taskman_task_outcomes",
            "Task attempts that ended, counted by all workers (shared in Redis)",
            labels=("event", "type"),
        )
        source = self.metrics._outcomes_source
        try:
            counts = source() if source else {}
        except Exception as error:  # Redis down: the scrape still answers
            log.warning("task outcomes unknown for /metrics: %s", error)
            counts = {}
        for key, value in sorted(counts.items()):
            event, _, task_type = key.partition(":")
            family.add_metric((event, task_type), float(value))
        yield family


class MetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request by its route template
    ("/tasks/{task_id}", never the raw path, which would be a series per task)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._series: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in METHODS else "other"
        status = 500  # if the app fails before it answers

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # As it arrived: routing rewrites root_path on the way into a mount.
        arrived = dict(scope)
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_observed)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")  # the API route FastAPI chose, if it ran
            template = scope.get(ROUTE_TEMPLATE) or (
                route.path if isinstance(route, APIRoute) else None
            )
            labels = (method, template or route_template(arrived), str(status))
            counter, histogram = self._series.get(labels) or self._new_series(labels)
            counter.inc()
            histogram.observe(elapsed)

    def _new_series(self, labels: tuple[str, str, str]) -> tuple[Any, Any]:
        """prometheus_client's labels() validates and locks on every call; the
        series of a route are few, so each is looked up once."""
        series = (
            self.metrics.requests.labels(*labels),
            self.metrics.latency.labels(*labels),
        )
        self._series[labels] = series
        return series


def route_template(scope: Scope) -> str:
    """The path template of the app's route for this (unrouted) request scope.

    For what FastAPI did not route itself: mounts (the dashboard), and requests
    a middleware answered (429, 413), which never reached the router.
    """
    app = scope.get("app")
    # On a copy: FastAPI's matching leaves notes in the scope.
    return _match(getattr(app, "routes", []), dict(scope)) or UNMATCHED


def _match(routes: Iterable[Any], scope: Scope) -> str | None:
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.NONE:
            continue
        # FastAPI 0.16x keeps an included router as one entry: look inside it.
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        found = (
            _match(inner, scope) if inner is not None else getattr(route, "path", None)
        )
        if match is Match.FULL and found:
            return str(found)
        partial = partial or found  # right path, wrong method: a 405
    return partial


def install_metrics(app: FastAPI, metrics: Metrics | None = None) -> Metrics:
    """Add the middleware and GET /metrics to ``app``; answer the Metrics.

    Call it after adding the other middleware: the last added runs first, so it
    then also counts what they refuse.
    """
    metrics = metrics or Metrics()
    app.state.metrics = metrics

    async def read_metrics(request: Request) -> Response:
        # Off the event loop: a queue-depth source may do blocking Redis I/O.
        body, media_type = await anyio.to_thread.run_sync(
            metrics.exposition, request.headers.get("accept", "")
        )
        return Response(body, media_type=media_type)

    app.add_route("/metrics", read_metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return metrics
