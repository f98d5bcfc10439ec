"""Phase 1: tasks wait in asyncio queues and run inside the API process.

An in-process event bus: POST puts a task id on a queue and answers at once; a fixed
set of consumer coroutines takes ids off and runs them. Everything is in memory, so a
restart loses every task that has not finished, and the timer of every scheduled
one: the lesson that leads to phase 2.
"""

import asyncio
import builtins
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.backend import (
    BackendUnavailable,
    IdempotencyConflict,
    QueueFull,
    TaskFinished,
)
from common.context import ProgressCallback, TaskCanceled, task_context
from common.listing import TaskQuery
from common.models import (
    Priority,
    Progress,
    Task,
    TaskCreate,
    TaskPage,
    TaskStatus,
    new_task,
    utcnow,
)
from common.settings import Settings
from common.tasks import TASKS, describe_error
from phase1_inprocess.index import TaskIndex
from phase1_inprocess.pool import CpuPool

log = logging.getLogger("taskman")

PENDING = (TaskStatus.QUEUED, TaskStatus.RETRYING)
# A lane is a priority queue of (rank, sequence, id): the lowest rank first, and
# within a rank the order they came in (the sequence breaks the tie).
RANK = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
Lane = asyncio.PriorityQueue[tuple[int, int, str]]


@dataclass
class _Entry:
    task: Task
    queue: Lane
    runner: "asyncio.Future[Any] | None" = None  # the running coroutine (I/O lane)
    slot: int | None = None  # the pool slot running it (CPU lane)
    timer: asyncio.TimerHandle | None = None  # its retry, or its scheduled start
    # Set, and dropped, at every change of the task: what wait() blocks on. Made
    # only once someone waits.
    changed: asyncio.Event | None = None


class InProcessBackend:
    """Two lanes: CPU-bound types go to a process pool, the rest run on the loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._tasks: dict[str, _Entry] = {}
        self._index = TaskIndex()
        # idempotency key -> (the body's fingerprint, the ids it queued)
        self._keys: dict[str, tuple[str, list[str]]] = {}
        # (deadline, key) in the order they were written, so expiry pops the left.
        self._task_expiry: deque[tuple[float, str]] = deque()
        self._key_expiry: deque[tuple[float, str]] = deque()
        self._io_queue: Lane = asyncio.PriorityQueue()
        self._cpu_queue: Lane = asyncio.PriorityQueue()
        self._sequence = itertools.count()
        self._scheduled: set[str] = set()  # ids whose timer waits for their run_at
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
        fingerprint = request.fingerprint() if idempotency_key else ""
        tasks, created = self._accept([request], idempotency_key, fingerprint)
        return tasks[0], created

    async def submit_many(
        self, requests: list[TaskCreate], idempotency_key: str | None = None
    ) -> tuple[list[Task], bool]:
        # Not any single POST's fingerprint: a key used for one never answers
        # the other.
        fingerprint = (
            "batch:" + ",".join(request.fingerprint() for request in requests)
            if idempotency_key
            else ""
        )
        return self._accept(requests, idempotency_key, fingerprint)

    async def get(self, task_id: str) -> Task | None:
        entry = self._tasks.get(task_id)
        # A copy: the entry's task changes in place, and wait() compares what a
        # caller saw with what it is now.
        return entry.task.model_copy() if entry else None

    async def wait(
        self, task_id: str, timeout: float, seen: Task | None = None
    ) -> Task | None:
        """At once if the task already differs from ``seen`` or has finished;
        else at its next change, or after ``timeout`` (``seen`` None: the next
        change)."""
        entry = self._tasks.get(task_id)
        if entry is None:
            return None
        if seen is not None and (entry.task != seen or entry.task.status.finished):
            return entry.task.model_copy()
        if entry.changed is None:
            entry.changed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(entry.changed.wait(), timeout)
        return await self.get(task_id)

    # (From here on in this class, ``list`` names this method: the annotations
    # below say builtins.list.)
    async def list(self, query: TaskQuery) -> TaskPage:
        return self._index.page(query, lambda task_id: self._tasks[task_id].task)

    async def cancel(self, task_id: str) -> Task | None:
        entry = self._tasks.get(task_id)
        if entry is None:
            return None
        if entry.task.status.finished:
            raise TaskFinished(f"task is already {entry.task.status}")
        if entry.timer is not None:
            entry.timer.cancel()
            self._scheduled.discard(task_id)
        if entry.runner is not None:
            entry.runner.cancel()
        if entry.slot is not None:
            self._pool.cancel(entry.slot)
        # A queued id stays in its queue; the consumer skips it when it comes up.
        self._finish(entry, TaskStatus.CANCELED)
        return entry.task.model_copy()

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
        queued = sum(e.task.status in PENDING for e in self._tasks.values())
        if queued or self._scheduled:
            # A scheduled task's timer lives in this process too: it goes with it.
            log.warning(
                "shutting down: %d scheduled and %d queued task(s) are lost; phase 1 "
                "keeps tasks in memory only (phase 2 keeps them in Redis)",
                len(self._scheduled),
                queued,
            )
        for entry in self._tasks.values():
            if entry.timer is not None:
                entry.timer.cancel()
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

    # --- taking tasks in

    def _accept(
        self, requests: builtins.list[TaskCreate], key: str | None, fingerprint: str
    ) -> tuple[builtins.list[Task], bool]:
        """Queue every request or none: every check comes before the first write."""
        if self._closing:
            raise BackendUnavailable("shutting down")
        self._expire()
        if key is not None:
            earlier = self._repeat(key, fingerprint)
            if earlier is not None:
                return earlier, False
        waiting = self._io_queue.qsize() + self._cpu_queue.qsize()
        if waiting + len(self._scheduled) + len(requests) > self._settings.max_queued:
            raise QueueFull(f"more than {self._settings.max_queued} tasks are waiting")
        tasks = [new_task(request, self._settings.max_retries) for request in requests]
        for task in tasks:
            cpu_bound = TASKS[task.type].cpu_bound
            entry = _Entry(task, self._cpu_queue if cpu_bound else self._io_queue)
            self._tasks[task.id] = entry
            self._index.add(task)
            if task.run_at is None:
                self._enqueue(entry)
            else:
                self._schedule(entry, task.run_at)
        if key is not None:
            self._keys[key] = (fingerprint, [task.id for task in tasks])
            deadline = time.monotonic() + self._settings.idempotency_ttl
            self._key_expiry.append((deadline, key))
        return [task.model_copy() for task in tasks], True

    def _enqueue(self, entry: _Entry) -> None:
        rank = RANK[entry.task.priority]
        entry.queue.put_nowait((rank, next(self._sequence), entry.task.id))

    def _schedule(self, entry: _Entry, run_at: datetime) -> None:
        """A timer on the loop for the task's run_at: in memory, lost on restart."""
        self._scheduled.add(entry.task.id)
        loop = asyncio.get_running_loop()
        delay = (run_at - utcnow()).total_seconds()
        entry.timer = loop.call_at(loop.time() + delay, self._due, entry, run_at)

    def _due(self, entry: _Entry, run_at: datetime) -> None:
        if utcnow() < run_at:  # the loop's clock ran ahead of the wall clock
            self._schedule(entry, run_at)
            return
        entry.timer = None
        self._scheduled.discard(entry.task.id)
        if entry.task.status is TaskStatus.SCHEDULED and not self._closing:
            entry.task.status = TaskStatus.QUEUED
            self._changed(entry)
            self._enqueue(entry)

    # --- the event bus

    async def _consume(self, queue: Lane, slot: int | None) -> None:
        while True:
            _, _, task_id = await queue.get()
            entry = self._tasks.get(task_id)
            if self._closing:
                return
            if entry is None or entry.task.status not in PENDING:
                continue  # canceled (or expired) while it waited
            task = entry.task
            task.status = TaskStatus.RUNNING
            task.attempts += 1
            task.started_at = utcnow()
            task.progress = None  # an attempt's progress is its own
            self._changed(entry)
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
        on_progress = self._progress(entry, task.attempts)
        if slot is not None:
            entry.slot = slot
            try:
                return await self._pool.run(
                    slot, task.type, task.payload, task.attempts, on_progress
                )
            finally:
                entry.slot = None
        if task_type.run_async is None:
            # Quick functions (echo, flaky, fail) run right here on the loop.
            with task_context(task.attempts, on_progress=on_progress):
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

    def _progress(self, entry: _Entry, attempt: int) -> ProgressCallback:
        """What the task function's report_progress() reaches, for this attempt."""

        def report(done: int, total: int, message: str | None) -> None:
            task = entry.task
            if task.status is TaskStatus.RUNNING and task.attempts == attempt:
                text = None if message is None else message[:200]
                task.progress = Progress(done=done, total=total, message=text)
                self._changed(entry)

        return report

    def _failed(self, entry: _Entry, error: Exception) -> None:
        task = entry.task
        task.error = describe_error(error)
        if task.attempts > task.max_retries:
            self._finish(entry, TaskStatus.FAILED)
            return
        task.status = TaskStatus.RETRYING
        self._changed(entry)
        delay = self._settings.retry_delay(task.attempts)
        if delay <= 0:
            # Back in its queue before this consumer takes the next task, so the
            # retry keeps its place by priority.
            self._retry(entry)
            return
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(delay, self._retry, entry)

    def _retry(self, entry: _Entry) -> None:
        entry.timer = None
        if entry.task.status is TaskStatus.RETRYING and not self._closing:
            self._enqueue(entry)  # at its own priority

    def _finish(self, entry: _Entry, status: TaskStatus) -> None:
        entry.task.status = status
        entry.task.finished_at = utcnow()
        self._changed(entry)
        deadline = time.monotonic() + self._settings.retention_seconds
        self._task_expiry.append((deadline, entry.task.id))

    def _changed(self, entry: _Entry) -> None:
        """Wake whoever waits for this task: wait(), so ?wait= and /events."""
        if entry.changed is not None:
            entry.changed.set()
            entry.changed = None

    def _running(self) -> builtins.list[_Entry]:
        return [e for e in self._tasks.values() if e.task.status is TaskStatus.RUNNING]

    # --- memory stays bounded

    def _repeat(self, key: str, fingerprint: str) -> builtins.list[Task] | None:
        seen = self._keys.get(key)
        if seen is None:
            return None
        first, task_ids = seen
        if fingerprint != first:
            raise IdempotencyConflict("Idempotency-Key was used with another body")
        entries = [self._tasks.get(task_id) for task_id in task_ids]
        if None in entries:
            return None  # one of them has expired: the key starts afresh
        return [entry.task.model_copy() for entry in entries if entry is not None]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._task_expiry and self._task_expiry[0][0] <= now:
            entry = self._tasks.pop(self._task_expiry.popleft()[1], None)
            if entry is not None:
                self._index.remove(entry.task)
                self._changed(entry)  # a waiter finds it gone
        while self._key_expiry and self._key_expiry[0][0] <= now:
            self._keys.pop(self._key_expiry.popleft()[1], None)
