"""Phase 2: what the API and the worker share: the job class, the task types'
functions, the Redis connection and the queue.

Jobs are plain RQ jobs with JSON data, so stock ``rq`` tools and rq-dashboard read
them; two extra fields of the job's hash count attempts and fence the outcome.
"""

import logging
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from redis.connection import UnixDomainSocketConnection, parse_url
from redis.sentinel import Sentinel
from rq import Queue
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now, utcformat

from common.models import Priority
from common.settings import Settings
from common.tasks import TASKS
from phase2_queue.replicas import PinnablePool, PinnableSentinelPool

log = logging.getLogger("taskman")

JOB_TIMEOUT = 300  # seconds; the longest task (sleep) takes 60
SOCKET_TIMEOUT = 15  # seconds a reply may take (see connect)

# A client names a registered type; its job names the function's dotted path.
FUNCTIONS = {name: f"{t.run.__module__}.{t.run.__name__}" for name, t in TASKS.items()}
# Anyone who can write to Redis can write a job, naming any importable function
# (RQ imports it, and importing alone runs a module's code). Ours run only these.
TYPES = {path: name for name, path in FUNCTIONS.items()}


class UnregisteredFunction(Exception):
    """A job names a function that is not one of the registered task types."""


class TaskJob(Job):
    """An RQ job with two extra fields in its hash: its attempts, and which
    execution is reporting its outcome."""

    attempts: int = 0
    # The execution that claimed the right to report this attempt's outcome
    # (worker.py); a DELETE that finds it answers 409.
    reporting: str | None = None

    def restore(self, raw_data: dict[Any, Any]) -> Any:
        restored = super().restore(raw_data)
        self.attempts = int(raw_data.get(b"attempts") or raw_data.get("attempts") or 0)
        if not isinstance(self.meta, dict):
            # Another client's meta, JSON but no object (5, null, [1]): RQ could
            # not write the job back (its save() takes meta for a dict), so no
            # retry or clean-up of it would go through. RQ's own shape for a meta
            # it cannot read.
            self.meta = {"unserialized": self.meta}
        reporting = raw_data.get(b"reporting") or raw_data.get("reporting")
        self.reporting = reporting.decode() if isinstance(reporting, bytes) else None
        # Our jobs have no callbacks or webhooks. One in Redis that names some
        # would have the worker import and call any function, or post anywhere.
        self._success_callback_name = None
        self._failure_callback_name = None
        self._stopped_callback_name = None
        self.webhooks = []
        return restored

    def _execute(self) -> Any:
        # Checked before RQ imports anything; a job whose data is not JSON (a
        # pickle, say) fails here too, with RQ's DeserializationError.
        if self.func_name not in TYPES or self.instance is not None:
            raise UnregisteredFunction(
                f"{self.func_name!r} is not a registered task function"
            )
        return super()._execute()

    def prepare_for_execution(self, worker_name: str, pipeline: Any) -> None:
        super().prepare_for_execution(worker_name, pipeline)
        # Same pipeline as RQ's own bookkeeping: no extra round trip.
        pipeline.hincrby(self.key, "attempts", 1)
        pipeline.hdel(self.key, "reporting")  # an earlier attempt's claim
        # And its progress: a task's progress is its current attempt's.
        if self.meta.pop("progress", None) is not None:
            pipeline.hset(self.key, "meta", self._serialize_meta())

    def retry(self, queue: Queue, pipeline: Any) -> None:
        """RQ's, with every write of a delayed retry in the caller's pipeline. RQ's
        writes the status at once (its set_status() is not given the pipeline),
        before the pipeline that records the failed attempt: a worker killed in
        between leaves the job marked scheduled but in no scheduled registry, and
        RQ's clean-up of the started registry passes over it (it takes back only
        jobs still marked started), so it would never run again."""
        interval = self.get_retry_interval()
        if not interval:
            super().retry(queue, pipeline)  # queued at once: all in the pipeline
            return
        assert self.retries_left
        self.retries_left -= 1
        due = now() + timedelta(seconds=interval)
        # What queue.schedule_job() writes.
        pipeline.sadd(queue.redis_queues_keys, queue.key)
        self.set_status(JobStatus.SCHEDULED, pipeline=pipeline)
        self.save(pipeline=pipeline)
        self.cleanup(ttl=self.ttl, pipeline=pipeline)
        registry = queue.scheduled_job_registry.key
        pipeline.zadd(registry, {self.id: int(due.timestamp())})
        self.log.info("Job %s: retry at %s, %s left", self.id, due, self.retries_left)


def connect(settings: Settings) -> redis.Redis:
    """A sync client for RQ (which is sync), with timeouts so nothing hangs.

    The one place every sync client is made (the API's phase-2 calls, the
    workers, their scheduler, the dashboard), so all of them follow the primary
    that Sentinel names, when TASKMAN_REDIS_SENTINELS is set. Its pool can pin a
    connection for a write and its WAIT (replicas.py).
    """
    if not settings.redis_configured:
        raise RuntimeError(
            "phase 2 needs Redis: set TASKMAN_REDIS_URL (or TASKMAN_REDIS_SENTINELS), "
            "or run `taskman serve`, which starts an embedded Redis"
        )
    timeouts: dict[str, Any] = dict(
        socket_connect_timeout=2,
        # Without a read timeout, a connection whose Redis vanished without
        # closing it (its host or network gone: no FIN ever comes) blocks its
        # reader forever: a worker in BLMOVE, the keeper's heartbeat (holding
        # the lock the job's end waits for), the join of the scheduler at a
        # start-over. It must outlast a worker's BLMOVE (RQ's dequeue timeout,
        # worker_ttl - 15 = 5 s here); RQ answers a timeout by quitting its
        # loop, and run_worker starts over. Keepalive finds an idle one dead.
        socket_timeout=SOCKET_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=10,
    )
    if settings.redis_sentinels:
        options = url_options(settings)
        sentinels = Sentinel(  # type: ignore[no-untyped-call]
            sentinel_addresses(settings),
            sentinel_kwargs=sentinel_options(options),
            **options,
        )
        assert settings.redis_sentinel_master  # the settings check both are set
        client: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
            settings.redis_sentinel_master,
            connection_pool_class=PinnableSentinelPool,
            **timeouts,
        )
        return client
    assert settings.redis_url
    return redis.Redis(
        connection_pool=PinnablePool.from_url(settings.redis_url, **timeouts)
    )


# Ask a sentinel that does not answer for no longer than this, then the next one.
SENTINEL_TIMEOUT = 0.5


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    """TASKMAN_REDIS_SENTINELS as (host, port) pairs ("[::1]:26379" too)."""
    pairs = (address.rpartition(":") for address in settings.redis_sentinels)
    return [(host.strip("[]"), int(port)) for host, _, port in pairs]


def url_options(settings: Settings) -> dict[str, Any]:
    """What TASKMAN_REDIS_URL says besides where Redis is: user, password,
    database, TLS (``rediss://`` and its ``ssl_*`` query options), as redis-py
    keywords. With sentinels, they say where; these go to every connection."""
    if not settings.redis_url:
        return {}
    options = dict(parse_url(settings.redis_url))  # type: ignore[no-untyped-call]
    if options.pop("connection_class", None) is UnixDomainSocketConnection:
        raise ValueError(
            "with TASKMAN_REDIS_SENTINELS, TASKMAN_REDIS_URL is no unix://"
        )
    for where in ("host", "port", "path"):
        options.pop(where, None)
    if settings.redis_url.startswith("rediss://"):
        options["ssl"] = True
    return options


def sentinel_options(options: dict[str, Any]) -> dict[str, Any]:
    """The same credentials and TLS for the sentinels; a sentinel has no database."""
    return {
        **{key: value for key, value in options.items() if key != "db"},
        "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT,
    }


# One RQ queue per priority; a worker listens on all three, in this order, and RQ
# takes from the first that has a job (`rq worker high default low`, RQ's own way).
PRIORITY_SUFFIX = {Priority.HIGH: "-high", Priority.NORMAL: "", Priority.LOW: "-low"}


def queue_name(settings: Settings, priority: Priority = Priority.NORMAL) -> str:
    """The RQ queue of a priority: ``taskman-high``, ``taskman``, ``taskman-low``."""
    return settings.queue_name + PRIORITY_SUFFIX[priority]


def queue_names(settings: Settings) -> list[str]:
    """Every queue of ours, in the order workers take from them."""
    return [queue_name(settings, priority) for priority in Priority]


def priority_of(origin: str | None) -> Priority:
    """A job's priority, read back from its origin queue's name (its suffix)."""
    for priority in (Priority.HIGH, Priority.LOW):
        if origin and origin.endswith(PRIORITY_SUFFIX[priority]):
            return priority
    return Priority.NORMAL


def due_second(due: datetime) -> datetime:
    """RQ's scheduled registry scores a job by its due time in whole seconds,
    rounded down, and its scheduler moves a job once its score has passed: the
    next whole second, so that a task never starts before its ``run_at``."""
    return datetime.fromtimestamp(math.ceil(due.timestamp()), UTC)


def index_key(settings: Settings) -> str:
    """The sorted set that lists our tasks newest first (common/listing.py): RQ
    keeps its registries by expiry, not by creation, and has no list of all jobs."""
    return f"taskman:index:{settings.queue_name}"


def task_queue(
    settings: Settings, connection: redis.Redis, priority: Priority = Priority.NORMAL
) -> Queue:
    return Queue(
        queue_name(settings, priority),
        connection=connection,
        serializer=JSONSerializer,  # never pickle: a job's data is plain JSON
        job_class=TaskJob,
    )


def task_queues(settings: Settings, connection: redis.Redis) -> list[Queue]:
    """The three queues, in the order workers take from them."""
    return [task_queue(settings, connection, priority) for priority in Priority]


def fail_unreadable(queue: Queue, job_id: str, error: Exception, pipe: Any) -> None:
    """Fail a job that cannot be read or written back, in ``pipe``; logged (once:
    it is failed, so never met again). Raw writes where RQ's would save() the job
    it could not read: its status, its end, the failed registry (for ``rq`` tools
    and the dashboard, which can requeue it once repaired)."""
    log.error(
        "job %s cannot be read or written back (%s: %s); failed, and the queue goes on",
        job_id,
        type(error).__name__,
        str(error)[:200],
    )
    key = Job.key_for(job_id)
    pipe.hset(key, mapping={"status": JobStatus.FAILED, "ended_at": utcformat(now())})
    failed = queue.failed_job_registry.key
    pipe.zadd(failed, {job_id: current_timestamp() + DEFAULT_FAILURE_TTL})
