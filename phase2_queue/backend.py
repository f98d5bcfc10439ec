"""Phase 2: tasks wait in Redis as plain RQ jobs; worker processes run them.

POST enqueues an RQ job (``Queue.enqueue``), GET reads it back (``Job.fetch`` and
its latest result), DELETE cancels it (``job.cancel``): RQ's public API, as its
documentation shows it. Nothing lives in the API process, so a restart loses no
task, and stock ``rq`` tools and rq-dashboard see every job.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import anyio
import redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from rq import Retry
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

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
        canceled = await _off_the_loop(self._cancel, task_id)
        return await self.get(task_id) if canceled else None

    def _cancel(self, task_id: str) -> bool:
        """RQ's own cancel, in a transaction that fails if the job changes meanwhile."""

        def once(pipe: Any) -> bool:
            try:
                job = TaskJob.fetch(
                    task_id, connection=self._redis, serializer=JSONSerializer
                )
                job.kwargs  # noqa: B018  # not JSON: not one of ours
            except (NoSuchJobError, DeserializationError):
                return False
            status = STATUSES.get(job.get_status(refresh=False), TaskStatus.QUEUED)
            if status.finished:
                raise TaskFinished(f"task is already {status}")
            pipe.multi()
            job.cancel(pipeline=pipe)
            pipe.hset(job.key, "ended_at", utcformat(now()))
            return True

        return _transaction(self._redis, once, f"rq:job:{task_id}")

    async def health(self) -> dict[str, Any]:
        return await _off_the_loop(self._health)

    def _health(self) -> dict[str, Any]:
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.ping()
            pipe.llen(self._queue.key)
            pipe.scard(f"rq:workers:{self._settings.queue_name}")
            _, queued, workers = pipe.execute()
        return {"redis": "ok", "queued": queued, "workers": workers}

    async def aclose(self) -> None:
        self._redis.close()


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
AUTHENTICATION_FAILED = (
    "the queue (Redis) refused our credentials: authentication failed "
    "(check the user and password of TASKMAN_REDIS_URL)"
)


@contextmanager
def unavailable_when_redis_is_down() -> Iterator[None]:
    """503 (with Retry-After) for a Redis that is away, or there but refusing."""
    try:
        yield
    # Before ConnectionError, whose subclass it is: a wrong password is no outage,
    # and whoever reads the 503 should know which to fix. Never the URL itself.
    except (
        redis.AuthenticationError,
        redis.AuthenticationWrongNumberOfArgsError,
    ) as error:
        raise BackendUnavailable(AUTHENTICATION_FAILED) from error
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
