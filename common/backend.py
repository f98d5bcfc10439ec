"""The one interface every phase implements, and the failures it may report.

Modelled on httpx's transports: the API talks only to a :class:`TaskBackend`, so a
phase is a new backend behind the same routes.
"""

from typing import Any, ClassVar, Protocol

from common.listing import TaskQuery
from common.models import Task, TaskCreate, TaskPage


class TaskBackend(Protocol):
    async def submit(
        self, request: TaskCreate, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        """Queue a task; answer it and whether it is new (False: an idempotent repeat)."""
        ...

    async def submit_many(
        self, requests: list[TaskCreate], idempotency_key: str | None = None
    ) -> tuple[list[Task], bool]:
        """Queue tasks all together or none (a batch); the key covers the batch."""
        ...

    async def get(self, task_id: str) -> Task | None: ...

    async def wait(
        self, task_id: str, timeout: float, seen: Task | None = None
    ) -> Task | None:
        """The task as soon as it is not ``seen`` (its status, progress, attempts
        or anything else changed) or has finished, else after ``timeout`` seconds
        as it is then; None if there is no such task. Never a poll in a loop of
        sleeps: each phase blocks on what its runners signal."""
        ...

    async def list(self, query: TaskQuery) -> TaskPage:
        """A page of tasks, newest first (see common/listing.py)."""
        ...

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
