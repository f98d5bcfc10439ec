"""Phase 1: tasks wait in asyncio queues and run inside the API process.

An in-process event bus: POST puts a task id on a queue and answers at once; a fixed
set of consumer coroutines takes ids off and runs them. Everything is in memory, so a
restart loses every task that has not finished: the lesson that leads to phase 2.
"""

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from common.backend import (
    BackendUnavailable,
    IdempotencyConflict,
    QueueFull,
    TaskFinished,
)
from common.context import TaskCanceled, task_context
from common.models import Task, TaskCreate, TaskStatus, new_task, utcnow
from common.settings import Settings
from common.tasks import TASKS, describe_error
from phase1_inprocess.pool import CpuPool

log = logging.getLogger("taskman")

PENDING = (TaskStatus.QUEUED, TaskStatus.RETRYING)


@dataclass
class _Entry:
    task: Task
    queue: "asyncio.Queue[str]"
    runner: "asyncio.Future[Any] | None" = None  # the running coroutine (I/O lane)
    slot: int | None = None  # the pool slot running it (CPU lane)
    retry: asyncio.TimerHandle | None = None  # the pending retry, while retrying


class InProcessBackend:
    """Two lanes: CPU-bound types go to a process pool, the rest run on the loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._tasks: dict[str, _Entry] = {}
        self._keys: dict[str, tuple[str, str]] = {}  # idempotency key -> (body, id)
        # (deadline, key) in the order they were written, so expiry pops the left.
        self._task_expiry: deque[tuple[float, str]] = deque()
        self._key_expiry: deque[tuple[float, str]] = deque()
        self._io_queue: asyncio.Queue[str] = asyncio.Queue()
        self._cpu_queue: asyncio.Queue[str] = asyncio.Queue()
        self._pool = CpuPool(settings.cpu_workers)
        self._closing = False
        self._consumers = [
            asyncio.create_task(self._consume(self._io_queue, slot=None))
            for _ in range(settings.io_concurrency)
        ] + [
            # One consumer per pool slot: the pool is never asked for more than it has.
            asyncio.create_task(self._consume(self._cpu_queue, slot=slot))
            for slot in range(settings.cpu_workers)
        ]

    async def submit(
        self, request: TaskCreate, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        if self._closing:
            raise BackendUnavailable("shutting down")
        self._expire()
        if idempotency_key is not None:
            earlier = self._repeat(idempotency_key, request)
            if earlier is not None:
                return earlier, False
        if (
            self._io_queue.qsize() + self._cpu_queue.qsize()
            >= self._settings.max_queued
        ):
            raise QueueFull(f"more than {self._settings.max_queued} tasks are waiting")
        task = new_task(request, self._settings.max_retries)
        cpu_bound = TASKS[task.type].cpu_bound
        entry = _Entry(task, self._cpu_queue if cpu_bound else self._io_queue)
        self._tasks[task.id] = entry
        entry.queue.put_nowait(task.id)
        if idempotency_key is not None:
            self._keys[idempotency_key] = (request.fingerprint(), task.id)
            deadline = time.monotonic() + self._settings.idempotency_ttl
            self._key_expiry.append((deadline, idempotency_key))
        return task, True

    async def get(self, task_id: str) -> Task | None:
        entry = self._tasks.get(task_id)
        return entry.task if entry else None

    async def cancel(self, task_id: str) -> Task | None:
        entry = self._tasks.get(task_id)
        if entry is None:
            return None
        if entry.task.status.finished:
            raise TaskFinished(f"task is already {entry.task.status}")
        if entry.retry is not None:
            entry.retry.cancel()
        if entry.runner is not None:
            entry.runner.cancel()
        if entry.slot is not None:
            self._pool.cancel(entry.slot)
        # A queued id stays in its queue; the consumer skips it when it comes up.
        self._finish(entry, TaskStatus.CANCELED)
        return entry.task

    async def health(self) -> dict[str, Any]:
        statuses = [entry.task.status for entry in self._tasks.values()]
        return {
            "queued": sum(status in PENDING for status in statuses),
            "running": statuses.count(TaskStatus.RUNNING),
            "cpu_workers": self._pool.size,
        }

    async def aclose(self) -> None:
        """Stop taking tasks, let running ones finish for a while, then stop."""
        self._closing = True
        lost = [e for e in self._tasks.values() if e.task.status in PENDING]
        if lost:
            log.warning(
                "shutting down: %d queued task(s) are lost; phase 1 keeps tasks in "
                "memory only (phase 2 keeps them in Redis)",
                len(lost),
            )
        deadline = time.monotonic() + self._settings.shutdown_timeout
        while self._running() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for entry in self._running():
            log.warning("shutting down: task %s canceled mid-run", entry.task.id)
            await self.cancel(entry.task.id)
        for consumer in self._consumers:
            consumer.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        await self._pool.aclose()

    # --- the event bus

    async def _consume(self, queue: "asyncio.Queue[str]", slot: int | None) -> None:
        while True:
            entry = self._tasks.get(await queue.get())
            if self._closing:
                return
            if entry is None or entry.task.status not in PENDING:
                continue  # canceled (or expired) while it waited
            task = entry.task
            task.status = TaskStatus.RUNNING
            task.attempts += 1
            task.started_at = utcnow()
            try:
                result = await self._execute(entry, slot)
            except TaskCanceled:
                continue  # cancel() has already recorded it
            except Exception as error:  # a task's failure, whatever it is
                if task.status is TaskStatus.RUNNING:
                    self._failed(entry, error)
            else:
                if task.status is TaskStatus.RUNNING:
                    task.result, task.error = result, None
                    self._finish(entry, TaskStatus.SUCCEEDED)

    async def _execute(self, entry: _Entry, slot: int | None) -> Any:
        task = entry.task
        task_type = TASKS[task.type]
        if slot is not None:
            entry.slot = slot
            try:
                return await self._pool.run(
                    slot, task.type, task.payload, task.attempts
                )
            finally:
                entry.slot = None
        if task_type.run_async is None:
            # Quick functions (echo, flaky, fail) run right here on the loop.
            with task_context(task.attempts):
                return task_type.run(**task.payload)
        runner = asyncio.ensure_future(task_type.run_async(**task.payload))
        entry.runner = runner
        try:
            # wait() rather than await: a cancel of the runner must not look like a
            # cancel of this consumer.
            await asyncio.wait([runner])
        finally:
            entry.runner = None
        if runner.cancelled():
            raise TaskCanceled
        return runner.result()

    def _failed(self, entry: _Entry, error: Exception) -> None:
        task = entry.task
        task.error = describe_error(error)
        if task.attempts > task.max_retries:
            self._finish(entry, TaskStatus.FAILED)
            return
        task.status = TaskStatus.RETRYING
        delay = self._settings.retry_delay(task.attempts)
        loop = asyncio.get_running_loop()
        entry.retry = loop.call_later(delay, self._retry, entry)

    def _retry(self, entry: _Entry) -> None:
        entry.retry = None
        if entry.task.status is TaskStatus.RETRYING and not self._closing:
            entry.queue.put_nowait(entry.task.id)

    def _finish(self, entry: _Entry, status: TaskStatus) -> None:
        entry.task.status = status
        entry.task.finished_at = utcnow()
        deadline = time.monotonic() + self._settings.retention_seconds
        self._task_expiry.append((deadline, entry.task.id))

    def _running(self) -> list[_Entry]:
        return [e for e in self._tasks.values() if e.task.status is TaskStatus.RUNNING]

    # --- memory stays bounded

    def _repeat(self, key: str, request: TaskCreate) -> Task | None:
        seen = self._keys.get(key)
        if seen is None:
            return None
        fingerprint, task_id = seen
        if fingerprint != request.fingerprint():
            raise IdempotencyConflict("Idempotency-Key was used with another body")
        entry = self._tasks.get(task_id)
        return entry.task if entry else None  # expired: the key starts afresh

    def _expire(self) -> None:
        now = time.monotonic()
        while self._task_expiry and self._task_expiry[0][0] <= now:
            self._tasks.pop(self._task_expiry.popleft()[1], None)
        while self._key_expiry and self._key_expiry[0][0] <= now:
            self._keys.pop(self._key_expiry.popleft()[1], None)
