"""Phase 2: the API only queues; tasks wait in Redis and RQ workers run them."""

from fastapi import FastAPI

from common.api import create_api
from common.settings import Settings
from phase2_queue.backend import RQBackend


def create_app(settings: Settings | None = None) -> FastAPI:
    """The phase-2 app; serve it with ``uvicorn --factory phase2_queue:create_app``."""
    return create_api(phase=2, settings=settings or Settings(), backend=RQBackend)
