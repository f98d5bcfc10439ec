"""Phase 1: the API and the tasks share one process and one asyncio event loop."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.api import create_api
from common.settings import Settings
from phase1_inprocess.backend import InProcessBackend


def create_app(settings: Settings | None = None) -> FastAPI:
    """The phase-1 app; serve it with ``uvicorn --factory phase1_inprocess:create_app``."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.backend = InProcessBackend(settings)
        try:
            yield
        finally:
            await app.state.backend.aclose()

    return create_api(phase=1, settings=settings, lifespan=lifespan)
