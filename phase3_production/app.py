"""Phase 3: phase 2's queue and workers, plus rate limits, the dashboard, a result
cache and metrics: each one a layer around the same app, over the engine room."""

from fastapi import FastAPI

from common.api import create_api
from common.backend import TaskBackend
from common.settings import Settings
from phase3_production.backend import FastRQBackend
from phase3_production.cache import CachedBackend, LocalCopies
from phase3_production.dashboard import mount_dashboard
from phase3_production.fastpath import FastPath
from phase3_production.fastsubmit import FastSubmit
from phase3_production.http_cache import HTTPCache
from phase3_production.metrics import CountedBackend, Metrics, install_metrics
from phase3_production.openapi import document_layers
from phase3_production.ratelimit import RateLimit
from phase3_production.worker import read_outcomes


def create_app(settings: Settings | None = None) -> FastAPI:
    """The phase-3 app; serve it with ``uvicorn --factory phase3_production:create_app``."""
    settings = settings or Settings()
    metrics = Metrics()
    copies = LocalCopies()  # the cache's copies in this process, which FastPath serves

    def backend(settings: Settings) -> TaskBackend:
        rq = FastRQBackend(settings)
        metrics.track_queue_depth(rq.queue_depth)
        metrics.track_outcomes(lambda: read_outcomes(rq.queue.connection))
        cached = CachedBackend(
            rq,
            rq.redis,
            rq.batch,
            ttl=settings.result_cache_ttl,
            retention=settings.retention_seconds,
            local=copies,
        )
        return CountedBackend(cached, metrics)

    app = create_api(phase=3, settings=settings, backend=backend)
    # Middleware added last runs first: metrics, then the rate limit, then a
    # cache hit answered at once, a valid POST /tasks submitted at once (both the
    # engine room), the HTTP side of the cache, then the routes.
    app.add_middleware(HTTPCache)
    app.add_middleware(FastSubmit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(FastPath, copies=copies, metrics=metrics)
    app.add_middleware(
        RateLimit, settings=settings, on_limited=metrics.count_rate_limited
    )
    mount_dashboard(app, settings)
    install_metrics(app, metrics)
    document_layers(app)
    return app
