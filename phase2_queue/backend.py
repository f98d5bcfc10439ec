"""Phase 2: tasks wait in Redis as plain RQ jobs; worker processes run them.

The hot paths speak Redis directly through ``redis.asyncio``: a POST writes the job
exactly as RQ's ``enqueue`` would (same hash, same queue list) in one atomic script,
and a GET reads the job's hash and latest result in one round trip; concurrent
requests share those round trips (autopipeline.py). The job hash is written here
(a test holds it to RQ's own) and read back by RQ's Job and Result classes, so
stock ``rq`` tools and workers see plain RQ jobs.
"""

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
from pydantic_core import to_json
from redis.exceptions import NoScriptError, OutOfMemoryError, ReadOnlyError
from rq import Queue
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from common.backend import BackendUnavailable, IdempotencyConflict, TaskFinished
from common.models import Task, TaskCreate, TaskStatus, new_task
from common.settings import Settings
from phase2_queue.async_redis import connect_async
from phase2_queue.autopipeline import AutoPipeline
from phase2_queue.worker import FUNCTIONS, TYPES, TaskJob, connect, task_queue

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

# SET NX the idempotency key, write the job hash, push its id: all or nothing, in
# one round trip. KEYS: the job's hash, the queue's list, the idempotency key (''
# for none). ARGV: the job id, the idempotency record and its TTL, then the hash's
# fields and values, flat. redis-py sends a call again when its connection fails,
# even if the first one reached Redis: a job that exists is such a repeat, and
# pushing its id again would run it twice. (Ids are random: a new one never exists.)
ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if KEYS[3] ~= '' then
  local earlier = redis.call('GET', KEYS[3])
  if earlier then return earlier end
  redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('SADD', 'rq:queues', KEYS[2])
return false
"""

JOB_TIMEOUT = 300  # seconds; the longest task (sleep) takes 60
SMALL_CALL = 512  # bytes of JSON
# Fields Job.to_dict() writes as "" until a worker or a callback sets them.
UNSET_FIELDS = (
    "success_callback_name",
    "failure_callback_name",
    "stopped_callback_name",
    "started_at",
    "ended_at",
    "last_heartbeat",
    "worker_name",
    "group_id",
)


class RQBackend:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # RQ itself is sync: cancel (not a hot path) uses it from a thread.
        self._sync = connect(settings)
        self._queue = task_queue(settings, self._sync)
        assert settings.redis_url
        self._redis = connect_async(settings.redis_url)
        self._enqueue_sha = self._redis.register_script(ENQUEUE).sha
        self._batch = AutoPipeline(self._redis)
        # What every job of ours has in common, as Job.to_dict() writes it.
        fixed = {
            **dict.fromkeys(UNSET_FIELDS, ""),
            "origin": self._queue.name,
            "status": JobStatus.QUEUED.value,
            "timeout": JOB_TIMEOUT,
            "result_ttl": settings.retention_seconds,
            "failure_ttl": settings.retention_seconds,
        }
        self._fixed_fields = [item for field in fixed.items() for item in field]

    @property
    def redis(self) -> aioredis.Redis:
        """The async client, for layers that phase 3 adds on top."""
        return self._redis

    @property
    def batch(self) -> AutoPipeline:
        """The hot path's shared pipelines, for phase 3's cache reads."""
        return self._batch

    @property
    def queue(self) -> Queue:
        return self._queue

    async def submit(
        self, request: TaskCreate, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        task = new_task(request, self._settings.max_retries)
        fingerprint = request.fingerprint() if idempotency_key else ""
        key = f"taskman:idempotency:{idempotency_key}" if idempotency_key else ""
        with unavailable_when_redis_is_down():
            earlier = await self._run_enqueue(
                f"rq:job:{task.id}",
                self._queue.key,
                key,
                task.id,
                f"{fingerprint} {task.id}",
                self._settings.idempotency_ttl,
                *self._job_hash(task),
            )
        if earlier:
            earlier_fingerprint, earlier_id = earlier.decode().split(" ")
            if earlier_fingerprint != fingerprint:
                raise IdempotencyConflict("Idempotency-Key was used with another body")
            found = await self.get(earlier_id)
            if found is not None:
                return found, False
            # The first task has expired: forget the key and start afresh.
            await self._redis.delete(key)
            return await self.submit(request, idempotency_key)
        return task, True

    async def _run_enqueue(self, *keys_and_args: Any) -> Any:
        """ENQUEUE by its digest, batched with other requests' (see autopipeline.py).
        A Redis that restarted has forgotten the script: load it and go again."""
        command = ("EVALSHA", self._enqueue_sha, 3, *keys_and_args)
        try:
            return await self._batch.execute_command(*command)
        except NoScriptError:
            await self._redis.script_load(ENQUEUE)
            return await self._batch.execute_command(*command)

    async def get(self, task_id: str) -> Task | None:
        with unavailable_when_redis_is_down():
            # One round trip, shared with other requests' (see autopipeline.py).
            raw, results = await self._batch.execute_commands(
                ("HGETALL", f"rq:job:{task_id}"),
                ("XREVRANGE", f"rq:results:{task_id}", "+", "-", "COUNT", 1),
            )
        if not raw or b"data" not in raw:
            return None
        job = TaskJob(task_id, connection=self._sync, serializer=JSONSerializer)
        try:
            job.restore(raw)
            latest = None
            if results:
                result_id, payload = results[0]
                latest = Result.restore(
                    task_id,
                    result_id.decode(),
                    payload,
                    connection=self._sync,
                    serializer=JSONSerializer,
                )
            return _task(job, latest)
        except DeserializationError:
            return None  # not JSON (a pickled job, say): not one of our tasks

    async def cancel(self, task_id: str) -> Task | None:
        with unavailable_when_redis_is_down():
            canceled = await anyio.to_thread.run_sync(self._cancel, task_id)
        return await self.get(task_id) if canceled else None

    def _cancel(self, task_id: str) -> bool:
        """RQ's own cancel, in a transaction that fails if the job changes meanwhile."""
        with self._sync.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(f"rq:job:{task_id}")  # type: ignore[no-untyped-call]
                    try:
                        job = TaskJob.fetch(
                            task_id, connection=self._sync, serializer=JSONSerializer
                        )
                        job.kwargs  # noqa: B018  # not JSON: not one of ours
                    except (NoSuchJobError, DeserializationError):
                        return False
                    status = STATUSES.get(
                        job.get_status(refresh=False), TaskStatus.QUEUED
                    )
                    if status.finished:
                        raise TaskFinished(f"task is already {status}")
                    pipe.multi()
                    job.cancel(pipeline=pipe)
                    pipe.hset(job.key, "ended_at", utcformat(now()))
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    async def health(self) -> dict[str, Any]:
        with unavailable_when_redis_is_down():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.ping()
                pipe.llen(self._queue.key)
                pipe.scard(f"rq:workers:{self._settings.queue_name}")
                _, queued, workers = await pipe.execute()
        return {"redis": "ok", "queued": queued, "workers": workers}

    async def aclose(self) -> None:
        await self._batch.aclose()
        await self._redis.aclose()
        self._sync.close()

    def _job_hash(self, task: Task) -> list[Any]:
        """The hash RQ's ``Queue.enqueue`` writes for this job (``Job.to_dict()``),
        as a flat list of fields and values.

        Built directly: RQ's ``Job.create`` and ``to_dict`` cost ~50 µs a job, as much
        as all the rest of a POST. tests/test_phase2.py holds it to RQ's own, field
        by field, so an RQ upgrade that changes the format fails a test, not a job.
        """
        # The call as RQ's JSONSerializer reads it: function, instance, args, kwargs.
        # (pydantic's to_json: the same JSON, less spaces, in a fifth of the time.)
        call = to_json([FUNCTIONS[task.type], None, [], task.payload])
        # RQ's utcformat(), without strftime's cost.
        moment = (
            task.created_at.replace(tzinfo=None).isoformat("T", "microseconds") + "Z"
        )
        fields = [
            *self._fixed_fields,
            *("data", _compress(call)),
            *("created_at", moment, "enqueued_at", moment),
            # A fixed, safe description: rq-dashboard renders it unescaped.
            *("description", f"taskman {task.type} task"),
            *("meta", f'{{"max_retries": {task.max_retries}}}'),
        ]
        if task.max_retries:
            delays = [
                self._settings.retry_delay(n) for n in range(1, task.max_retries + 1)
            ]
            fields += ("retries_left", task.max_retries)
            fields += ("retry_intervals", to_json(delays))
        return fields


def _task(job: TaskJob, latest: Result | None) -> Task:
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
        created_at=_utc(job.created_at) or now(),
        started_at=_utc(job.started_at) if job.attempts else None,
        finished_at=_utc(job.ended_at) if status.finished else None,
    )


def _short_error(exc_string: str, job: TaskJob) -> str:
    """The exception line of RQ's traceback ("RuntimeError: boom"), never the rest."""
    lines = [line for line in exc_string.splitlines() if line.strip()]
    # Read as Python writes it: a header, the frames (indented), the exception's
    # line. The rest of a multi-line message follows and may look like anything,
    # frames included; a chained exception starts with a header of its own.
    found, in_frames = None, False
    for line in lines:
        if line == "Traceback (most recent call last):":
            in_frames = True
        elif in_frames and not line[0].isspace():
            found, in_frames = line, False
    if found is None:  # not a traceback: a note of RQ's own
        if "AbandonedJobError" in exc_string:
            return f"WorkerLost: worker {job.worker_name or '?'} died during the task"
        found = lines[-1] if lines else "error"
    return found[:500]


def _compress(data: bytes) -> bytes:
    """In zlib's format, as RQ's zlib.decompress() expects. zlib.compress() first
    sets up a 32 KiB window and its tables: ~30 µs of CPU on this machine, for a
    call of 50 bytes that it cannot make any smaller. A small call is stored as
    it is (level 0, a 512-byte window: under 1 µs); a large one is compressed."""
    if len(data) > SMALL_CALL:
        return zlib.compress(data)
    compressor = zlib.compressobj(0, zlib.DEFLATED, 9, 1)
    return compressor.compress(data) + compressor.flush()


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
