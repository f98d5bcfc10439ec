"""Phase 2: the API only queues; tasks wait in Redis and RQ workers run them."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.api import create_api
from common.settings import Settings
from phase2_queue.backend import RQBackend


def create_app(settings: Settings | None = None) -> FastAPI:
    """The phase-2 app; serve it with ``uvicorn --factory phase2_queue:create_app``."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.backend = RQBackend(settings)
        try:
            yield
        finally:
            await app.state.backend.aclose()

    return create_api(phase=2, settings=settings, lifespan=lifespan)
