"""Phase 1 done wrong, for the bench only: CPU-bound tasks run on the event loop.

It shows in numbers why phase 1 sends them to a process pool."""

from typing import Any

from fastapi import FastAPI

from common.api import create_api
from common.context import task_context
from common.settings import Settings
from common.tasks import TASKS
from phase1_inprocess.backend import InProcessBackend, _Entry


class NaiveBackend(InProcessBackend):
    async def _execute(self, entry: _Entry, slot: int | None) -> Any:
        task = entry.task
        with task_context(task.attempts):
            # The mistake: a second of hashing here blocks every other request.
            return TASKS[task.type].run(**task.payload)


def create_app() -> FastAPI:
    return create_api(phase=1, settings=Settings(), backend=NaiveBackend)
