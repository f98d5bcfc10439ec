"""Phase 2: tasks wait in Redis as plain RQ jobs; worker processes run them.

POST enqueues an RQ job (``Queue.enqueue``), GET reads it back (``Job.fetch`` and
its latest result), DELETE cancels it (``job.cancel``): RQ's public API, as its
documentation shows it. Nothing lives in the API process, so a restart loses no
task, and stock ``rq`` tools and rq-dashboard see every job.
"""

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import anyio
import redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from rq import Retry
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry
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
from phase2_queue.replicas import replicated

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

log = logging.getLogger("taskman")

# What reading a job that another client wrote (or damaged) can raise: RQ's
# DeserializationError for data no JSON decoder reads; ValueError (pydantic's
# ValidationError is one) or TypeError and the like for a field of the wrong
# shape (a date that is not a date, a payload that is not an object). Such a job
# is not one of our tasks: 404, never a 500.
UNREADABLE = (DeserializationError, ValueError, TypeError, AttributeError, KeyError)


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
            latest = job.latest_result()
            registry = end_registry(job, latest)
            ended: Any = self._redis.zscore(registry, task_id) if registry else None
            return to_task(cast(TaskJob, job), latest, ended)
        except NoSuchJobError:
            return None
        except UNREADABLE as error:
            return not_a_task(task_id, error)

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
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.ping()
            pipe.llen(self._queue.key)
            pipe.smembers(f"rq:workers:{self._settings.queue_name}")
            _, queued, workers = pipe.execute()
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


async def _off_the_loop(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking RQ call in a thread, Redis trouble answered as a 503."""
    with unavailable_when_redis_is_down():
        return await anyio.to_thread.run_sync(function, *args)


def _transaction(connection: redis.Redis, once: Callable[[Any], T], key: str) -> T:
    """redis-py's ``transaction()``: ``once(pipe)`` with ``key`` watched, again until
    the key did not change meanwhile; ``once``'s value (redis-py types it None)."""
    value = connection.transaction(once, key, value_from_callable=True)  # type: ignore[arg-type]
    return cast(T, value)


def to_task(
    job: TaskJob, latest: Result | None, ended_score: float | None = None
) -> Task:
    """The task a job is; ``ended_score``: the job's score in ``end_registry()``'s
    registry, when that names one."""
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
        max_retries=_max_retries(job.meta),
        # RQ's dates are aware, in UTC.
        created_at=job.created_at,
        started_at=job.started_at if job.attempts else None,
        finished_at=_finished_at(job, latest, ended_score) if status.finished else None,
    )


def _max_retries(meta: Any) -> int:
    """Ours is in the job's meta; another client's meta may be anything (RQ reads
    one it cannot decode, a pickle say, as ``{"unserialized": ...}``)."""
    value = meta.get("max_retries") if isinstance(meta, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def end_registry(job: Job, latest: Result | None) -> str | None:
    """The registry whose score dates the end of a finished job that has neither
    ``ended_at`` nor a result: plain RQ's cancel (``rq`` tools, ``Job.cancel()``)
    writes neither; None when the job's own fields date it (no read needed)."""
    if job.ended_at is not None or latest is not None:
        return None
    status = job.get_status(refresh=False)
    if status == JobStatus.CANCELED:
        return CanceledJobRegistry(job.origin, connection=job.connection).key
    if status in (JobStatus.FAILED, JobStatus.STOPPED):
        return str(job.failed_job_registry.key)
    return None


def _finished_at(
    job: TaskJob, latest: Result | None, ended_score: float | None
) -> datetime:
    """When a finished job ended: the best moment RQ recorded, for a finished task
    always has a ``finished_at``.
    1. ``ended_at``: what RQ's worker (and our cancel) writes;
    2. the latest result's ``created_at``: RQ's clean-up of a dead worker's job
       fails it with a result but no ``ended_at``;
    3. its score in ``end_registry()``'s registry: the moment of plain RQ's
       cancel; for the failed registry, the moment plus the failure TTL;
    4. else its last heartbeat, start, enqueue or creation: a job that another
       client marked finished by hand, and RQ dated no further.
    """
    if job.ended_at is not None:
        return job.ended_at
    if latest is not None:
        return latest.created_at
    if ended_score is not None:
        moment = ended_score
        if job.get_status(refresh=False) != JobStatus.CANCELED:
            moment -= job.failure_ttl or DEFAULT_FAILURE_TTL
        if math.isfinite(moment) and 0 < moment < 2**33:  # +inf: a TTL of -1
            return datetime.fromtimestamp(moment, UTC)
    return job.last_heartbeat or job.started_at or job.enqueued_at or job.created_at


# Job ids already reported unreadable, so that a client polling one does not
# fill the log; bounded.
_reported: set[str] = set()


def not_a_task(task_id: str, error: Exception) -> Task | None:
    """A job this API cannot read as a task (``UNREADABLE``): None, the route's
    404; logged once per job, with what was wrong."""
    if task_id not in _reported:
        if len(_reported) > 10_000:
            _reported.clear()
        _reported.add(task_id)
        log.warning(
            "job %s is not a task this API can read (%s: %s): answered 404",
            task_id,
            type(error).__name__,
            str(error)[:200],
        )
    return None


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
