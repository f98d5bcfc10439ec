"""Phase 2: tasks wait in Redis as plain RQ jobs; worker processes run them.

POST enqueues an RQ job (``Queue.enqueue``), GET reads it back (``Job.fetch`` and
its latest result), DELETE cancels it (``job.cancel``): RQ's public API, as its
documentation shows it. Nothing lives in the API process, so a restart loses no
task, and stock ``rq`` tools and rq-dashboard see every job.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar, cast

import anyio
import redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from rq import Retry
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat, utcparse

from common.backend import BackendUnavailable, IdempotencyConflict, TaskFinished
from common.models import Task, TaskCreate, TaskStatus, new_task
from common.settings import Settings
from common.tasks import describe_traceback
from phase2_queue.jobs import (
    FUNCTIONS,
    JOB_TIMEOUT,
    TYPES,
    TaskJob,
    connect,
    task_queue,
)

STATUSES = {
    JobStatus.QUEUED: TaskStatus.QUEUED,
    JobStatus.DEFERRED: TaskStatus.QUEUED,
    JobStatus.SCHEDULED: TaskStatus.RETRYING,  # only retries are scheduled here
    JobStatus.STARTED: TaskStatus.RUNNING,
    JobStatus.FINISHED: TaskStatus.SUCCEEDED,
    JobStatus.FAILED: TaskStatus.FAILED,
    JobStatus.STOPPED: TaskStatus.FAILED,
    JobStatus.CANCELED: TaskStatus.CANCELED,
}

T = TypeVar("T")


class RQBackend:
    """RQ and redis-py's client are synchronous: each call below runs in a worker
    thread (``anyio.to_thread``), so that while one request waits on Redis the
    event loop serves the others. That hand-off is most of what a request costs
    here; phase 3's engine room talks to Redis from the loop instead."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._redis = connect(settings)
        self._queue = task_queue(settings, self._redis)

    async def submit(
        self, request: TaskCreate, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        return await _off_the_loop(self._submit, request, idempotency_key)

    def _submit(
        self, request: TaskCreate, idempotency_key: str | None
    ) -> tuple[Task, bool]:
        task = new_task(request, self._settings.max_retries)
        if idempotency_key is None:
            return to_task(self._enqueue(task), None), True
        # The key and the job go in one transaction (MULTI/EXEC), watched: if
        # another request takes the key meanwhile, redis-py goes again, and this
        # time finds its task.
        key = f"taskman:idempotency:{idempotency_key}"

        def once(pipe: Any) -> tuple[Task, bool]:
            earlier = self._repeat(pipe.get(key), request)
            if earlier is not None:
                return earlier, False
            pipe.multi()
            record = f"{request.fingerprint()} {task.id}"
            pipe.set(key, record, ex=self._settings.idempotency_ttl)
            return to_task(self._enqueue(task, pipeline=pipe), None), True

        return _transaction(self._redis, once, key)

    def _enqueue(self, task: Task, pipeline: Any = None) -> TaskJob:
        retries = task.max_retries
        delays = [self._settings.retry_delay(n) for n in range(1, retries + 1)]
        job = self._queue.enqueue(
            FUNCTIONS[task.type],  # a dotted path: the worker imports it
            kwargs=task.payload,  # explicit, so no payload field is taken for an option
            job_id=task.id,
            meta={"max_retries": retries},
            # RQ types the intervals as int; it stores and waits floats just as well.
            retry=Retry(max=retries, interval=delays) if retries else None,  # type: ignore[arg-type]
            job_timeout=JOB_TIMEOUT,
            result_ttl=self._settings.retention_seconds,
            failure_ttl=self._settings.retention_seconds,
            # A fixed, safe description: rq-dashboard renders it unescaped.
            description=f"taskman {task.type} task",
            pipeline=pipeline,
        )
        return cast(TaskJob, job)  # the queue's job_class

    def _repeat(self, record: Any, request: TaskCreate) -> Task | None:
        """The task an earlier request with this key created, if it still exists."""
        if record is None:
            return None
        fingerprint, task_id = record.decode().split(" ")
        if fingerprint != request.fingerprint():
            raise IdempotencyConflict("Idempotency-Key was used with another body")
        return self._get(task_id)  # expired: the key starts afresh

    async def get(self, task_id: str) -> Task | None:
        return await _off_the_loop(self._get, task_id)

    def _get(self, task_id: str) -> Task | None:
        try:
            job = TaskJob.fetch(
                task_id, connection=self._redis, serializer=JSONSerializer
            )
            return to_task(cast(TaskJob, job), job.latest_result())
        except (NoSuchJobError, DeserializationError):
            return None  # not JSON (a pickled job, say): not one of our tasks

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
            except (NoSuchJobError, DeserializationError):
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
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.ping()
            pipe.llen(self._queue.key)
            pipe.sort(**worker_heartbeats(self._settings.queue_name))
            _, queued, beats = pipe.execute()
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


def worker_heartbeats(queue_name: str) -> dict[str, Any]:
    """SORT arguments that read every registered worker's last heartbeat in one
    command (None where its hash is gone). What ``Worker.all(queue=...)`` and
    ``worker.last_heartbeat`` tell, in one round trip instead of 1 + 2 a worker:
    /health is polled."""
    return {
        "name": f"rq:workers:{queue_name}",  # its members are the workers' keys
        "by": "nosort",
        "get": "*->last_heartbeat",
    }


def live_workers(beats: list[bytes | None]) -> int:
    """How many of these heartbeats (RQ's UTC stamps) are recent enough."""
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


async def _off_the_loop(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking RQ call in a thread, Redis trouble answered as a 503."""
    with unavailable_when_redis_is_down():
        return await anyio.to_thread.run_sync(function, *args)


def _transaction(connection: redis.Redis, once: Callable[[Any], T], key: str) -> T:
    """redis-py's ``transaction()``: ``once(pipe)`` with ``key`` watched, again until
    the key did not change meanwhile; ``once``'s value (redis-py types it None)."""
    value = connection.transaction(once, key, value_from_callable=True)  # type: ignore[arg-type]
    return cast(T, value)


def to_task(job: TaskJob, latest: Result | None) -> Task:
    status = STATUSES.get(job.get_status(refresh=False), TaskStatus.QUEUED)
    if status is TaskStatus.QUEUED and job.attempts:
        status = TaskStatus.RETRYING  # back in the queue after a failed attempt
    result = error = None
    if latest is not None:
        if latest.type == Result.Type.SUCCESSFUL:
            result = latest.return_value
        elif status is not TaskStatus.SUCCEEDED:
            error = _short_error(latest.exc_string or "", job)
    return Task(
        id=job.id,
        type=TYPES.get(job.func_name or "", job.func_name or "?"),
        status=status,
        payload=job.kwargs,
        result=result,
        error=error,
        attempts=job.attempts,
        max_retries=job.meta.get("max_retries", 0),
        # RQ's dates are aware, in UTC.
        created_at=job.created_at,
        started_at=job.started_at if job.attempts else None,
        finished_at=job.ended_at if status.finished else None,
    )


def _short_error(exc_string: str, job: TaskJob) -> str:
    """The exception line of RQ's traceback ("RuntimeError: boom"), never the rest."""
    if "Traceback" not in exc_string and "AbandonedJobError" in exc_string:
        # Not a traceback: RQ's note on a job whose worker died.
        return f"WorkerLost: worker {job.worker_name or '?'} died during the task"
    return describe_traceback(exc_string)


# Redis is up but will not write: out of memory (maxmemory, noeviction), a read-only
# replica, or unable to persist (MISCONF: its disk is full).
REFUSING_WRITES = "the queue (Redis) refuses writes for now; retry shortly"


@contextmanager
def unavailable_when_redis_is_down() -> Iterator[None]:
    """503 (with Retry-After) for a Redis that is away, or there but refusing."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise BackendUnavailable(
            "the queue (Redis) is unreachable; retry shortly"
        ) from error
    except (OutOfMemoryError, ReadOnlyError) as error:
        raise BackendUnavailable(REFUSING_WRITES) from error
    except redis.ResponseError as error:
        if str(error).startswith(("MISCONF", "NOREPLICAS")):
            raise BackendUnavailable(REFUSING_WRITES) from error
        raise  # anything else is a bug of ours: a 500, and a traceback in the log
