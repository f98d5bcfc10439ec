"""Phase 3: phase 2's queue and workers, plus rate limits, the dashboard, a result
cache and metrics: each one a layer around the same app."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.api import create_api
from common.settings import Settings
from phase2_queue.backend import RQBackend
from phase2_queue.worker import read_outcomes
from phase3_production.backend import CachedBackend
from phase3_production.dashboard import mount_dashboard
from phase3_production.http_cache import HTTPCache
from phase3_production.metrics import Metrics, install_metrics
from phase3_production.ratelimit import RateLimit


def create_app(settings: Settings | None = None) -> FastAPI:
    """The phase-3 app; serve it with ``uvicorn --factory phase3_production:create_app``."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        inner = RQBackend(settings)
        app.state.backend = CachedBackend(
            inner,
            ttl=settings.result_cache_ttl,
            retention=settings.retention_seconds,
            metrics=metrics,
        )
        metrics.track_queue_depth(lambda: inner.queue.count)
        metrics.track_outcomes(lambda: read_outcomes(inner.queue.connection))
        try:
            yield
        finally:
            await app.state.backend.aclose()

    app = create_api(phase=3, settings=settings, lifespan=lifespan)
    # Middleware added last runs first: metrics, then the rate limit, then the
    # HTTP side of the cache, then the routes.
    app.add_middleware(HTTPCache)
    app.add_middleware(
        RateLimit, settings=settings, on_limited=metrics.count_rate_limited
    )
    mount_dashboard(app, settings)
    install_metrics(app, metrics)
    return app
