"""Phase 3: a result cache for finished tasks, in front of any backend.

A finished task changes only if someone acts on Redis behind our back (a requeue or
delete in rq-dashboard), so it is worth caching, in two layers:
- in Redis, shared by every API process: the task's JSON with the job's status and
  end as they were when it was cached. One round trip reads the entry *and* the
  job's live status and end; if they differ, the entry is dropped. So this layer is
  never stale.
- in this process, for at most ``LOCAL_SECONDS``: no round trip at all. This is the
  only layer that can be stale, by at most that long. It keeps the answer's bytes
  too, so that fastpath.py can serve a hit without the app.
Entries never outlive RQ's own result TTL, and concurrent misses for one task share
a single backend read (no stampede when many clients poll a task that just finished).
"""

import asyncio
import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from common.backend import BackendUnavailable, TaskBackend
from common.listing import TaskQuery
from common.models import Task, TaskCreate, TaskPage
from phase2_queue.outages import unavailable_when_redis_is_down
from phase3_production.autopipeline import AutoPipeline

# Bounded staleness of the in-process layer (the contract allows 2 s).
LOCAL_SECONDS = 1.0

# Where the last get() in this request found its answer: "HIT" or "MISS". The
# X-Cache header is set from it (see http_cache.py).
cache_outcome: ContextVar[str | None] = ContextVar("cache_outcome", default=None)


@dataclass(slots=True)
class Copy:
    """A finished task as this process holds it: until ``expires`` (monotonic),
    with the exact bytes the API answers it with (fastpath.py serves those)."""

    expires: float
    task: Task
    body: bytes
    etag: str = ""  # the body's ETag, filled in by the first fast answer

    def fresh(self) -> bool:
        return self.expires > time.monotonic()


class LocalCopies:
    """The in-process layer: finished tasks by id, each trusted ``LOCAL_SECONDS``.

    One object, shared by the cache (which fills it) and the fast path in front
    of the app (which reads it), so both answer from the same copy."""

    def __init__(self, limit: int = 10_000) -> None:
        self._copies: dict[str, Copy] = {}
        self._limit = limit

    def fresh(self, task_id: str) -> Copy | None:
        """The copy of ``task_id`` if it is still to be trusted."""
        copy = self._copies.get(task_id)
        return copy if copy is not None and copy.fresh() else None

    def remember(self, task: Task) -> None:
        if len(self._copies) > self._limit:  # bounded: drop the oldest half
            for key in list(self._copies)[: self._limit // 2]:
                del self._copies[key]
        body = task.model_dump_json().encode()  # what common.api answers with
        self._copies[task.id] = Copy(time.monotonic() + LOCAL_SECONDS, task, body)

    def forget(self, task_id: str) -> None:
        self._copies.pop(task_id, None)


class CachedBackend:
    """Any backend whose tasks are RQ jobs in this Redis, cached; the entries are
    read through ``batch`` (one round trip with the job's live status)."""

    def __init__(
        self,
        inner: TaskBackend,
        redis: aioredis.Redis,
        batch: AutoPipeline,
        ttl: int,
        retention: int,
        local: LocalCopies | None = None,
    ) -> None:
        self._inner = inner
        self._redis = redis
        self._batch = batch
        self._ttl = ttl
        self._retention = retention  # RQ's result_ttl: the job itself expires then
        self._local = local if local is not None else LocalCopies()
        self._inflight: dict[str, asyncio.Future[Task | None]] = {}

    async def submit(
        self, request: TaskCreate, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        return await self._inner.submit(request, idempotency_key)

    async def submit_many(
        self, requests: list[TaskCreate], idempotency_key: str | None = None
    ) -> tuple[list[Task], bool]:
        return await self._inner.submit_many(requests, idempotency_key)

    async def get(self, task_id: str) -> Task | None:
        local = self._local.fresh(task_id)
        if local is not None:
            self._outcome(hit=True)
            return local.task
        cached, seen = await self._from_redis(task_id)
        if cached is not None:
            self._outcome(hit=True)
            self._remember(cached)
            return cached
        self._outcome(hit=False)
        # One read per task however many requests miss at once.
        if task_id in self._inflight:
            return await asyncio.shield(self._inflight[task_id])
        future: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()
        self._inflight[task_id] = future
        try:
            task = await self._inner.get(task_id)
            if task is not None and task.status.finished:
                # Redis refusing writes (full?) means no cache entry, not an error.
                with contextlib.suppress(BackendUnavailable):
                    await self._store(task, seen)

            future.set_result(task)
            return task
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark it retrieved: no "never retrieved" warning
            raise
        finally:
            del self._inflight[task_id]

    async def wait(
        self, task_id: str, timeout: float, seen: Task | None = None
    ) -> Task | None:
        """A finished task cached already is the answer at once (nothing more can
        happen to it); else the inner backend's wait. What that returns is not
        stored here: the entry needs the job's state from before the read, and
        the next GET stores it."""
        local = self._local.fresh(task_id)
        if local is not None:
            return local.task
        cached, _ = await self._from_redis(task_id)
        if cached is not None:
            self._remember(cached)
            return cached
        return await self._inner.wait(task_id, timeout, seen)

    async def list(self, query: TaskQuery) -> TaskPage:
        return await self._inner.list(query)

    async def cancel(self, task_id: str) -> Task | None:
        await self.invalidate(task_id)
        return await self._inner.cancel(task_id)

    async def health(self) -> dict[str, Any]:
        return await self._inner.health()

    async def aclose(self) -> None:
        await self._inner.aclose()

    def _outcome(self, hit: bool) -> None:
        cache_outcome.set("HIT" if hit else "MISS")  # for X-Cache and the metrics

    async def invalidate(self, task_id: str) -> None:
        self._local.forget(task_id)
        with unavailable_when_redis_is_down():
            await self._redis.delete(_key(task_id))

    async def _from_redis(self, task_id: str) -> tuple[Task | None, bytes]:
        """The cached task if the job is as it was when cached; and the job as it
        is now (its status and end), to store with the task a miss reads next."""
        with unavailable_when_redis_is_down():
            (cached_seen, body), live = await self._batch.execute_commands(
                ("HMGET", _key(task_id), "seen", "task"),
                ("HMGET", f"rq:job:{task_id}", "status", "ended_at"),
            )
        # The end too, not the status alone: a requeued task that fails again is
        # "failed" again, with a new attempt and a new end.
        seen = b" ".join(value or b"" for value in live)
        if body is None:
            return None, seen
        if cached_seen != seen:  # requeued, run again or deleted behind our back
            await self.invalidate(task_id)
            return None, seen
        return Task.model_validate_json(body), seen

    async def _store(self, task: Task, seen: bytes) -> None:
        """Cache ``task`` with ``seen``, the job as it was before the task was read
        from it: a change in between makes the next read a miss, never stale."""
        if task.finished_at is None:  # never, from our backends; not cached if so
            return
        finished = task.finished_at.replace(tzinfo=task.finished_at.tzinfo or UTC)
        left = self._retention - (datetime.now(UTC) - finished).total_seconds()
        ttl = int(min(self._ttl, left))
        if ttl <= 0:
            return
        with unavailable_when_redis_is_down():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    _key(task.id),
                    mapping={"seen": seen, "task": task.model_dump_json()},
                )
                pipe.expire(_key(task.id), ttl)
                await pipe.execute()
        self._remember(task)

    def _remember(self, task: Task) -> None:
        self._local.remember(task)


def _key(task_id: str) -> str:
    return f"taskman:cache:{task_id}"
