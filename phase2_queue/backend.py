"""Phase 2: tasks wait in Redis as plain RQ jobs; worker processes run them.

POST enqueues an RQ job (``Queue.enqueue``), GET reads it back (``Job.fetch`` and
its latest result), DELETE cancels it (``job.cancel``): RQ's public API, as its
documentation shows it. Nothing lives in the API process, so a restart loses no
task, and stock ``rq`` tools and rq-dashboard see every job.
"""

from collections.abc import Callable
from datetime import datetime
from itertools import groupby
from typing import Any, TypeVar, cast

import anyio
import redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat, utcparse

from common.backend import IdempotencyConflict, TaskFinished
from common.listing import TaskQuery, position
from common.models import (
    BatchCreate,
    Priority,
    Task,
    TaskCreate,
    TaskPage,
    TaskStatus,
    new_task,
)
from common.settings import Settings
from phase2_queue.jobs import (
    FUNCTIONS,
    JOB_TIMEOUT,
    TaskJob,
    connect,
    due_second,
    index_key,
    task_queue,
)
from phase2_queue.listing import read_page, read_tasks
from phase2_queue.outages import unavailable_when_redis_is_down
from phase2_queue.reading import (
    STATUSES,
    UNREADABLE,
    end_registry,
    not_a_task,
    to_task,
)
from phase2_queue.replicas import replicated

__all__ = [
    "UNREADABLE",
    "RQBackend",
    "end_registry",
    "live_workers",
    "not_a_task",
    "to_task",
]

# A wait blocks on RQ's results stream, which only an attempt's end writes, in
# slices of WAIT_SLICE: a change that writes no result (a start, progress, a
# cancel) shows at the end of its slice. A quarter second: progress comes at most
# every 0.2 s (common/context.py), and a waiter costs four reads a second at most
# (phase 3 wakes on a stream of its own instead). Each slice runs on a thread of
# the waits' own limiter (RQBackend.__init__): up to this many block at once;
# more take turns. redis-py's pool opens a connection for each (it has no
# ceiling), and its read timeout (jobs.py, SOCKET_TIMEOUT) outlasts the block.
WAIT_SLICE = 0.25
WAIT_THREADS = 64

T = TypeVar("T")


class RQBackend:
    """RQ and redis-py's client are synchronous: each call below runs in a worker
    thread (``anyio.to_thread``), so that while one request waits on Redis the
    event loop serves the others. That hand-off is most of what a request costs
    here; phase 3's engine room talks to Redis from the loop instead."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._redis = connect(settings)
        # One RQ queue per priority (jobs.py); workers take high, normal, low.
        self._queues = {p: task_queue(settings, self._redis, p) for p in Priority}
        self._queue = self._queues[Priority.NORMAL]
        self._index = index_key(settings)
        # A wait holds a thread (and a connection) for a slice at a time:
        # waits take turns on threads of their own, so that many clients waiting
        # never starve GET and POST of anyio's default 40.
        self._waits = anyio.CapacityLimiter(WAIT_THREADS)

    async def submit(
        self, request: TaskCreate, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        # With TASKMAN_REDIS_MIN_REPLICAS, the write and then WAIT on one connection.
        return await _off_the_loop(
            replicated,
            self._settings,
            self._redis,
            self._submit,
            request,
            idempotency_key,
        )

    def _submit(
        self, request: TaskCreate, idempotency_key: str | None
    ) -> tuple[Task, bool]:
        task = new_task(request, self._settings.max_retries)

        def enqueue(pipe: Any) -> list[Task]:
            return [to_task(self._enqueue(task, pipe), None)]

        tasks, created = self._in_one_transaction(
            enqueue, request.fingerprint(), idempotency_key
        )
        return tasks[0], created

    async def submit_many(
        self, requests: list[TaskCreate], idempotency_key: str | None = None
    ) -> tuple[list[Task], bool]:
        return await _off_the_loop(
            replicated,
            self._settings,
            self._redis,
            self._submit_many,
            requests,
            idempotency_key,
        )

    def _submit_many(
        self, requests: list[TaskCreate], idempotency_key: str | None
    ) -> tuple[list[Task], bool]:
        tasks = [new_task(r, self._settings.max_retries) for r in requests]
        # Built from requests already validated: no validator runs again.
        fingerprint = BatchCreate.model_construct(tasks=requests).fingerprint()

        def enqueue(pipe: Any) -> list[Task]:
            jobs: list[TaskJob] = []
            # In the order sent, so that the jobs' creation times (the list's
            # order) follow it: each run of tasks for one queue is one RQ batch
            # enqueue, into the caller's transaction; enqueue_at takes it too.
            for (priority, due), run in groupby(
                tasks, lambda t: (t.priority, t.run_at)
            ):
                if due is not None:
                    jobs += [self._enqueue(task, pipe, index=False) for task in run]
                    continue
                datas = [Queue.prepare_data(**self._job_data(task)) for task in run]
                enqueued = self._queues[priority].enqueue_many(datas, pipeline=pipe)
                jobs += [cast(TaskJob, job) for job in enqueued]
            entries = {position(job.id, job.created_at): 0 for job in jobs}
            pipe.zadd(self._index, entries)
            return [to_task(job, None) for job in jobs]

        return self._in_one_transaction(enqueue, fingerprint, idempotency_key)

    def _in_one_transaction(
        self,
        enqueue: Callable[[Any], list[Task]],
        fingerprint: str,
        idempotency_key: str | None,
    ) -> tuple[list[Task], bool]:
        """``enqueue(pipe)``'s jobs, their index entries and the idempotency key's
        record, in one MULTI/EXEC: all of them land, or none. With a key, it is
        watched: if another request takes it meanwhile, redis-py goes again, and
        this time finds its tasks."""
        if idempotency_key is None:
            with self._redis.pipeline() as pipe:
                tasks = enqueue(pipe)
                pipe.execute()
            return tasks, True
        key = f"taskman:idempotency:{idempotency_key}"

        def once(pipe: Any) -> tuple[list[Task], bool]:
            earlier = self._repeat(pipe.get(key), fingerprint)
            if earlier is not None:
                return earlier, False
            pipe.multi()
            tasks = enqueue(pipe)
            record = " ".join([fingerprint, *(task.id for task in tasks)])
            pipe.set(key, record, ex=self._settings.idempotency_ttl)
            return tasks, True

        return _transaction(self._redis, once, key)

    def _job_data(self, task: Task) -> dict[str, Any]:
        """The arguments of RQ's ``Queue.prepare_data()`` for a task's job."""
        retries = task.max_retries
        delays = [self._settings.retry_delay(n) for n in range(1, retries + 1)]
        meta: dict[str, Any] = {"max_retries": retries}
        if task.run_at is not None:
            meta["run_at"] = task.run_at.isoformat()  # GET reads it from the job
        return {
            "func": FUNCTIONS[task.type],  # a dotted path: the worker imports it
            "kwargs": task.payload,  # explicit, so no payload field is an option
            "job_id": task.id,
            "meta": meta,
            # RQ types the intervals as int; it stores and waits floats as well.
            "retry": Retry(max=retries, interval=delays) if retries else None,  # type: ignore[arg-type]
            "timeout": JOB_TIMEOUT,
            "result_ttl": self._settings.retention_seconds,
            "failure_ttl": self._settings.retention_seconds,
            # A fixed, safe description: rq-dashboard renders it unescaped.
            "description": f"taskman {task.type} task",
        }

    def _enqueue(self, task: Task, pipeline: Any, index: bool = True) -> TaskJob:
        """``enqueue`` (or ``enqueue_at``, for a due time) in ``pipeline``, with
        the task's entry in the index (see listing.py)."""
        options = self._job_data(task)
        function = options.pop("func")
        options["job_timeout"] = options.pop("timeout")  # enqueue's name for it
        queue = self._queues[task.priority]
        if task.run_at is None:
            job = queue.enqueue(function, **options, pipeline=pipeline)
        else:
            job = queue.enqueue_at(
                due_second(task.run_at), function, **options, pipeline=pipeline
            )
        if index:
            pipeline.zadd(self._index, {position(job.id, job.created_at): 0})
        return cast(TaskJob, job)  # the queue's job_class

    def _repeat(self, record: Any, fingerprint: str) -> list[Task] | None:
        """The tasks an earlier request with this key created, if all still exist."""
        if record is None:
            return None
        earlier, *task_ids = record.decode().split(" ")
        if earlier != fingerprint:
            raise IdempotencyConflict("Idempotency-Key was used with another body")
        tasks = read_tasks(self._redis, task_ids)  # one round trip for a batch
        if not all(isinstance(task, Task) for task in tasks):
            return None  # one has expired: the key starts afresh
        return cast(list[Task], tasks)

    async def get(self, task_id: str) -> Task | None:
        return await _off_the_loop(self._get, task_id)

    def _get(self, task_id: str) -> Task | None:
        return self._read(task_id)[0]

    def _read(self, task_id: str) -> tuple[Task | None, str]:
        """The task, and the id of the last entry in its results stream ("0-0":
        none yet), from where a wait blocks."""
        try:
            job = TaskJob.fetch(
                task_id, connection=self._redis, serializer=JSONSerializer
            )
            latest = job.latest_result()
            registry = end_registry(job, latest)
            ended: Any = self._redis.zscore(registry, task_id) if registry else None
            task = to_task(cast(TaskJob, job), latest, ended)
            return task, latest.id if latest and latest.id else "0-0"
        except NoSuchJobError:
            return None, "0-0"
        except UNREADABLE as error:
            return not_a_task(task_id, error), "0-0"

    async def wait(
        self, task_id: str, timeout: float, seen: Task | None = None
    ) -> Task | None:
        """Blocks on RQ's results stream, as ``Result.fetch_latest(timeout=)``
        does, a slice (WAIT_SLICE) at a time: a change that writes no result (an
        attempt's start, progress, a cancel) is seen at the end of its slice."""
        deadline = anyio.current_time() + timeout
        task, entry = await _off_the_loop(self._read, task_id, limiter=self._waits)
        while task is not None and not task.status.finished and task == seen:
            left = deadline - anyio.current_time()
            if left <= 0:
                break
            block = min(left, WAIT_SLICE)
            task, entry = await _off_the_loop(
                self._next, task_id, entry, block, limiter=self._waits
            )
        return task

    def _next(
        self, task_id: str, entry: str, seconds: float
    ) -> tuple[Task | None, str]:
        """The task after a result newer than ``entry`` lands, or ``seconds`` pass."""
        stream = Result.get_key(task_id)  # type: ignore[no-untyped-call]  # rq:results:{id}
        # XREAD BLOCK 0 would block for ever: at least a millisecond.
        self._redis.xread({stream: entry}, count=1, block=max(1, int(seconds * 1000)))
        return self._read(task_id)

    async def list(self, query: TaskQuery) -> TaskPage:
        return await _off_the_loop(read_page, self._redis, self._index, query)

    async def cancel(self, task_id: str) -> Task | None:
        # The answer comes from the transaction that canceled: a GET after it
        # could already read what a worker wrote since.
        return await _off_the_loop(self._cancel, task_id)

    def _cancel(self, task_id: str) -> Task | None:
        """RQ's own cancel, in a transaction that fails if the job changes meanwhile."""

        def once(pipe: Any) -> Task | None:
            try:
                job = TaskJob.fetch(
                    task_id, connection=self._redis, serializer=JSONSerializer
                )
                assert isinstance(job, TaskJob)
                job.kwargs  # noqa: B018  # not JSON: not one of ours
            except (NoSuchJobError, *UNREADABLE):
                return None
            status = STATUSES.get(job.get_status(refresh=False), TaskStatus.QUEUED)
            if status.finished:
                raise TaskFinished(f"task is already {status}")
            if status is TaskStatus.RUNNING and job.reporting:
                # Its worker has claimed the outcome (worker.py): it lands next.
                raise TaskFinished("task is already finishing")
            latest = job.latest_result()
            seen = job.get_status(refresh=False)
            pipe.multi()
            try:
                job.cancel(pipeline=pipe)
            except ValueError as error:
                # RQ reads the job's executions outside the transaction: one of
                # them gone means its worker ended it since we looked. Look again.
                stored: Any = self._redis.hget(job.key, "status")
                if stored == seen.encode():
                    raise
                pipe.reset()  # out of MULTI, for redis-py to watch again
                raise redis.WatchError(str(error)) from error
            job.ended_at = now()
            pipe.hset(job.key, "ended_at", utcformat(job.ended_at))
            return to_task(job, latest)

        return _transaction(self._redis, once, f"rq:job:{task_id}")

    async def health(self) -> dict[str, Any]:
        return await _off_the_loop(self._health)

    def _health(self) -> dict[str, Any]:
        queues = self._queues.values()
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.ping()
            for queue in queues:
                pipe.llen(queue.key)
            # A worker is in the worker set of each queue it listens on (all three).
            pipe.sunion([f"rq:workers:{queue.name}" for queue in queues])
            _, *lengths, workers = pipe.execute()
        queued = sum(lengths)
        with self._redis.pipeline(transaction=False) as pipe:
            for worker in workers:  # the members are the workers' keys
                pipe.hget(worker, "last_heartbeat")
            beats = pipe.execute()
        return {"redis": "ok", "queued": queued, "workers": live_workers(beats)}

    async def aclose(self) -> None:
        self._redis.close()


# A live worker writes its heartbeat (``last_heartbeat`` in its hash) at least every
# 5 s: idle, when its wait for a job times out (RQ: worker_ttl - 15; worker.py sets
# worker_ttl=20), busy, from the keeper (recovery.py). RQ promises the next beat
# within worker_ttl. A killed worker's name stays in the queue's worker set until a
# maintenance pass cleans it, and its hash lives on for worker_ttl + 60 s: counting
# either would count the dead.
LIVE_WORKER_SECONDS = 20


def live_workers(beats: list[bytes | None]) -> int:
    """How many of these heartbeats (RQ's UTC stamps) are recent enough. Read as
    SMEMBERS, then HGET of each, not in one SORT ... GET: SORT is in Redis's
    @dangerous category, which SECURITY.md's ACL denies."""
    moment = now()
    return sum(1 for beat in beats if _recent(beat, moment))


def _recent(beat: bytes | None, moment: datetime) -> bool:
    if beat is None:
        return False
    try:
        stamp = utcparse(beat.decode())
    except (UnicodeDecodeError, ValueError):
        return False  # not RQ's stamp: not a worker /health can vouch for
    return (moment - stamp).total_seconds() < LIVE_WORKER_SECONDS


async def _off_the_loop(
    function: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter | None = None
) -> T:
    """Run a blocking RQ call in a thread, Redis trouble answered as a 503."""
    with unavailable_when_redis_is_down():
        return await anyio.to_thread.run_sync(function, *args, limiter=limiter)


def _transaction(connection: redis.Redis, once: Callable[[Any], T], key: str) -> T:
    """redis-py's ``transaction()``: ``once(pipe)`` with ``key`` watched, again until
    the key did not change meanwhile; ``once``'s value (redis-py types it None)."""
    value = connection.transaction(once, key, value_from_callable=True)  # type: ignore[arg-type]
    return cast(T, value)
