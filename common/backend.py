"""The one interface every phase implements, and the failures it may report.

Modelled on httpx's transports: the API talks only to a :class:`TaskBackend`, so a
phase is a new backend behind the same routes.
"""

from typing import Any, ClassVar, Protocol

from common.models import Task, TaskCreate


class TaskBackend(Protocol):
    async def submit(
        self, request: TaskCreate, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        """Queue a task; answer it and whether it is new (False: an idempotent repeat)."""
        ...

    async def get(self, task_id: str) -> Task | None: ...

    async def cancel(self, task_id: str) -> Task | None:
        """Cancel a pending or running task; raise TaskFinished if it is done."""
        ...

    async def health(self) -> dict[str, Any]:
        """Facts for GET /health; raise BackendUnavailable when degraded."""
        ...

    async def aclose(self) -> None: ...


class BackendError(Exception):
    """A failure the API turns into a JSON error response."""

    status_code: ClassVar[int] = 500
    headers: ClassVar[dict[str, str]] = {}


class BackendUnavailable(BackendError):
    """The queue cannot take or answer requests now; the client should retry."""

    status_code = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class QueueFull(BackendUnavailable):
    """Too many tasks are waiting; nothing was accepted."""


class TaskFinished(BackendError):
    status_code = 409


class IdempotencyConflict(BackendError):
    status_code = 409
