"""Phase 1: the API and the tasks share one process and one asyncio event loop."""

from fastapi import FastAPI

from common.api import create_api
from common.settings import Settings
from phase1_inprocess.backend import InProcessBackend


def create_app(settings: Settings | None = None) -> FastAPI:
    """The phase-1 app; serve it with ``uvicorn --factory phase1_inprocess:create_app``."""
    return create_api(
        phase=1, settings=settings or Settings(), backend=InProcessBackend
    )
