"""Phase 2: the process that runs tasks: RQ's SimpleWorker, plus what it takes to
lose nothing and to stop on request.

1. It counts attempts (for ``flaky`` and for GET) in the job's own hash.
2. Cancel is cooperative: a task's checkpoint() reads the job's status in Redis.
3. Crash recovery in seconds, not RQ's minutes: a keeper thread beats the job's
   heartbeat with a short TTL and runs RQ's registry clean-up often, which requeues
   (or fails) a killed worker's job; a job taken off the queue by a worker that died
   before starting it goes back after one heartbeat TTL; the scheduler (delayed
   retries) rides out Redis outages and a dead owner's lock is freed.
4. It runs only the registered task functions, whatever a job in Redis names.
"""

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from uuid import uuid4

import redis
from rq import Queue, SimpleWorker, worker_registration
from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus
from rq.registry import clean_registries
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat
from rq.worker import WorkerStatus

from common.context import task_context
from common.process import close_inherited_sockets, die_with_parent
from common.settings import Settings
from common.tasks import TASKS

log = logging.getLogger("taskman")

# Outcome counters ("succeeded:echo" -> n) for /metrics, written in the same
# pipelines as RQ's own per-worker counts: no extra round trip.
OUTCOMES_KEY = "taskman:outcomes"

# RQ's dequeue moves a job from the queue to an "intermediate" list, which the job
# leaves when its worker starts it. For a worker that died in between: the job
# back at the head of the queue, unless it was canceled meanwhile. One script, so
# that two cleaners can never both push it.
RESCUE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[2], 'enqueued_at', ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[1])
return 1
"""

# RQ's scheduler holds its lock for 61 s (interval + 60) and refreshes it every
# second. A worker that dies after taking the lock and before its scheduler runs
# (or a scheduler that dies without letting go) leaves it taken that long, every
# delayed retry waiting. A lock not refreshed for STALE_SCHEDULER_SECONDS has no
# live owner: free it, in one script, for a live worker to take.
SCHEDULER_LOCK_TTL = 61
STALE_SCHEDULER_SECONDS = 10
FREE_STALE_LOCK = """
local ttl = redis.call('TTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# A client names a registered type; its job names the function's dotted path.
FUNCTIONS = {name: f"{t.run.__module__}.{t.run.__name__}" for name, t in TASKS.items()}
# Anyone who can write to Redis can write a job, naming any importable function
# (RQ imports it, and importing alone runs a module's code). Ours run only these.
TYPES = {path: name for name, path in FUNCTIONS.items()}


class UnregisteredFunction(Exception):
    """A job names a function that is not one of the registered task types."""


class TaskJob(Job):
    """An RQ job that counts its attempts in one extra field of its hash."""

    attempts: int = 0

    def restore(self, raw_data: dict[Any, Any]) -> Any:
        restored = super().restore(raw_data)
        self.attempts = int(raw_data.get(b"attempts") or raw_data.get("attempts") or 0)
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

    def retry(self, queue: Queue, pipeline: Any) -> None:
        """RQ's, with every write of a delayed retry in the caller's pipeline. RQ's
        writes the status and the scheduled-registry entry at once (the registry's
        schedule() ignores its pipeline), before the pipeline that records the
        failed attempt: a worker killed in between leaves the job both scheduled
        and started, with its retry not counted, so it runs once too often."""
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

    def prepare_for_execution(self, worker_name: str, pipeline: Any) -> None:
        super().prepare_for_execution(worker_name, pipeline)
        # Same pipeline as RQ's own bookkeeping: no extra round trip.
        pipeline.hincrby(self.key, "attempts", 1)


class TaskWorker(SimpleWorker):
    """SimpleWorker (no fork per job: ~2.5x the forking Worker on a no-op job)."""

    def __init__(
        self,
        *args: Any,
        heartbeat_ttl: int = 10,
        scheduler_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.heartbeat_ttl = heartbeat_ttl
        self.scheduler_name = scheduler_name or uuid4().hex
        self._running: Job | None = None
        self._job_beat_at = 0.0
        self._lock = threading.Lock()
        self._canceled = False
        self._failure = "failed"
        self._task_type = "?"
        self._stop_keeper = threading.Event()
        self._worker_beat_at = self._suspension_checked_at = -1.0
        self._state_written: str | None = None
        self._rescue = self.connection.register_script(RESCUE)
        self._free_stale_lock = self.connection.register_script(FREE_STALE_LOCK)

    # --- attempts and cooperative cancel

    def perform_job(self, job: Job, queue: Queue) -> bool:
        assert isinstance(job, TaskJob)
        self._canceled = False
        self._task_type = _task_type(job)
        # prepare_for_execution (inside perform_job) counts this attempt.
        with task_context(job.attempts + 1, lambda: self._is_canceled(job)):
            performed: bool = super().perform_job(job, queue)
            return performed

    def _is_canceled(self, job: Job) -> bool:
        status: Any = self.connection.hget(job.key, "status")
        self._canceled = status == b"canceled"
        return self._canceled

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
    ) -> None:
        if self._canceled:
            # It stopped because DELETE canceled it: not a failure, no retry.
            with self.connection.pipeline() as pipeline:
                self.cleanup_execution(job, pipeline=pipeline)
                pipeline.execute()
            return
        self._failure = "retried" if job.should_retry else "failed"
        super().handle_job_failure(job, queue, started_job_registry, exc_string)

    def increment_successful_job_count(self, pipeline: Any = None) -> None:
        super().increment_successful_job_count(pipeline)
        self._count("succeeded", pipeline)

    def increment_failed_job_count(self, pipeline: Any = None) -> None:
        super().increment_failed_job_count(pipeline)
        self._count(self._failure, pipeline)

    def _count(self, outcome: str, pipeline: Any) -> None:
        key = f"{outcome}:{self._task_type}"
        (pipeline or self.connection).hincrby(OUTCOMES_KEY, key, 1)

    # --- fewer round trips per job: RQ's loop makes ~18 for a no-op job, and
    # they, not the job, set the pace. These overrides save 10 of them.

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's worker heartbeat, at most once a second, in one round trip.

        RQ sends it three times around every job, as two commands each. The key
        it refreshes lives for worker_ttl + 60 s (80 here); a second is nothing.
        """
        if pipeline is not None:  # part of a pipeline already: costs nothing
            super().heartbeat(timeout, pipeline)
            return
        if timeout is None and time.monotonic() - self._worker_beat_at < 1:
            return
        with self.connection.pipeline() as pipe:
            super().heartbeat(timeout, pipe)
            pipe.execute()
        self._worker_beat_at = time.monotonic()

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's, minus the write when Redis already has this state from us. RQ
        writes "idle" after each job, in a round trip of its own, and again
        before the next; ours goes in the job's last pipeline (cleanup_execution).
        A pipeline's write counts as landed: RQ retries a pipeline that fails,
        and a worker that loses Redis starts over as a new TaskWorker."""
        if pipeline is None and state == self._state_written:
            return
        super().set_state(state, pipeline)
        self._state_written = state

    def handle_execution_ended(
        self, job: Job, queue: Queue, heartbeat_ttl: int
    ) -> None:
        """RQ's stamps the job and writes a heartbeat to cover its callbacks; ours
        have none (TaskJob.restore drops them), and the job's last pipeline saves
        the same stamps."""
        job.ended_at = job.last_heartbeat = now()

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's check for `rq suspend`, at most once a second, not before every job."""
        if time.monotonic() - self._suspension_checked_at < 1:
            return
        super().check_for_suspension(burst)
        self._suspension_checked_at = time.monotonic()

    # --- short heartbeats, frequent clean-up

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.heartbeat_ttl

    def prepare_job_execution(self, job: Job, *args: Any, **kwargs: Any) -> None:
        super().prepare_job_execution(job, *args, **kwargs)
        with self._lock:
            self._running, self._job_beat_at = job, time.monotonic()

    def cleanup_execution(self, job: Job, pipeline: Any) -> None:
        with self._lock:  # no heartbeat may land after the execution is gone
            self._running = None
        super().cleanup_execution(job, pipeline)
        self.set_state(WorkerStatus.IDLE, pipeline=pipeline)

    def _keep(self) -> None:
        last_cleanup = time.monotonic()
        while not self._stop_keeper.wait(min(1.0, self.heartbeat_ttl / 4)):
            try:
                with self._lock:
                    due = time.monotonic() - self._job_beat_at > self.heartbeat_ttl / 3
                    if self._running is not None and due and self.execution:
                        self.maintain_heartbeats(self._running)
                        self._job_beat_at = time.monotonic()
                if time.monotonic() - last_cleanup > self.maintenance_interval:
                    self._clean_started_jobs()
                    last_cleanup = time.monotonic()
            except redis.RedisError as error:
                log.warning("worker keeper: %s", error)

    def _clean_started_jobs(self) -> None:
        """RQ's registry clean-up, which requeues or fails abandoned jobs.

        Not BaseWorker.clean_registries(): that one also moves the clock of the
        main loop's maintenance, the only place where a worker takes over the
        scheduler of one that died; run from here, it would never come due.
        """
        for queue in self.queues:
            with self._maintenance_lock(queue) as ours:
                if ours:
                    clean_registries(queue, self._exc_handlers)
                    self._rescue_dequeued(queue)
                    self._free_stale_scheduler_lock(queue)

    def clean_registries(self) -> None:
        """The main loop's clean-up: ours (above) in place of RQ's, whose rescue
        of jobs left in the intermediate list comes a minute late, counts as a
        failed attempt, and can take a job that is back in that list, about to be
        started by a live worker, for one left there."""
        self._clean_started_jobs()
        for queue in self.queues:
            worker_registration.clean_worker_registry(queue)
        self.last_cleaned_at = now()  # type: ignore[assignment]  # rq infers None

    @contextmanager
    def _maintenance_lock(self, queue: Queue) -> Iterator[bool]:
        """RQ's clean-up lock, for 30 s rather than RQ's 899: a worker killed while
        cleaning would otherwise stop every clean-up for 15 minutes."""
        key = queue.registry_cleaning_key
        ours = bool(self.connection.set(key, self.name, nx=True, ex=30))
        try:
            yield ours
        finally:
            if ours:
                self.connection.delete(key)

    def _free_stale_scheduler_lock(self, queue: Queue) -> None:
        key = RQScheduler.get_locking_key(queue.name)
        fresh = SCHEDULER_LOCK_TTL - STALE_SCHEDULER_SECONDS
        if self._free_stale_lock(keys=[key], args=[fresh]):
            log.warning("freed the scheduler lock of a scheduler that is gone")

    def _rescue_dequeued(self, queue: Queue) -> None:
        """Requeue the jobs seen dequeued but not started for a heartbeat TTL."""
        dequeued: Any = self.connection.lrange(queue.intermediate_queue_key, 0, -1)
        started = set(queue.started_job_registry.get_job_ids(cleanup=False))
        waiting = [i.decode() for i in dequeued if i.decode() not in started]
        seen_key = f"taskman:dequeued:{queue.name}"
        with self.connection.pipeline() as pipe:
            for job_id in waiting:
                pipe.hget(f"rq:job:{job_id}", "enqueued_at")
            pipe.hgetall(seen_key)
            *stamps, seen = pipe.execute()
        moment = time.time()
        keep: dict[str, str] = {}
        for job_id, stamp in zip(waiting, stamps, strict=True):
            # Each retry enqueues the job anew: its stamp tells this stay in the
            # list from an earlier one, which a worker did start.
            mark = f"{(stamp or b'').decode()} "
            earlier = seen.get(job_id.encode(), b"").decode()
            if not earlier.startswith(mark):
                keep[job_id] = f"{mark}{moment}"
            elif moment - float(earlier[len(mark) :]) < self.heartbeat_ttl:
                keep[job_id] = earlier
            elif self._rescue(
                keys=[queue.intermediate_queue_key, f"rq:job:{job_id}", queue.key],
                args=[job_id, utcformat(now())],
            ):
                log.warning("job %s: its worker died before starting it", job_id)
        with self.connection.pipeline() as pipe:
            pipe.delete(seen_key)
            if keep:
                pipe.hset(seen_key, mapping=keep)
                pipe.expire(seen_key, 3600)
            pipe.execute()

    def _start_scheduler(
        self, burst: bool = False, logging_level: str | None = "INFO", *_: Any
    ) -> None:
        """RQ's, with a TaskScheduler (below) in place of RQScheduler."""
        scheduler: Any = TaskScheduler(  # Any: RQ's scheduler is untyped
            self.queues,
            connection=self.connection,
            logging_level=logging_level or "INFO",
            serializer=self.serializer,
            name=self.scheduler_name,
        )
        self.scheduler = scheduler
        scheduler.acquire_locks()
        if not scheduler.acquired_locks:
            return
        if not burst:
            scheduler.start()
            return
        try:  # a burst worker moves what is due once, and lets go
            scheduler.register_birth()
            scheduler.enqueue_scheduled_jobs()
        finally:
            scheduler.release_locks()
            scheduler.register_death()

    def work(self, *args: Any, **kwargs: Any) -> bool:
        keeper = threading.Thread(target=self._keep, name="keeper", daemon=True)
        keeper.start()
        try:
            worked: bool = super().work(*args, **kwargs)
            return worked
        finally:
            self._stop_keeper.set()
            keeper.join()


class TaskScheduler(RQScheduler):
    """RQ's scheduler (a process the worker forks; it moves delayed retries to
    the queue when due), made to ride out a Redis outage. RQ's dies at the first
    connection error, and its lock stays taken for a minute (its TTL): every
    delayed retry waits that long unless its worker lives to restart it."""

    def work(self) -> None:
        while True:
            try:
                super().work()  # type: ignore[no-untyped-call]
                return
            except redis.RedisError as error:
                if self._stop_requested:
                    return
                self.log.warning("scheduler lost Redis (%s); retrying", error)
                time.sleep(1)


def _task_type(job: Job) -> str:
    try:
        name = job.func_name
    except DeserializationError:  # not ours: the job fails when performed
        return "?"
    return TYPES.get(name or "", "?")


def read_outcomes(connection: redis.Redis) -> dict[str, float]:
    """What every worker has counted so far: {"succeeded:echo": n, ...}."""
    counts: Any = connection.hgetall(OUTCOMES_KEY)
    return {key.decode(): float(value) for key, value in counts.items()}


def connect(settings: Settings) -> redis.Redis:
    """A sync client for RQ (which is sync), with timeouts so nothing hangs."""
    if not settings.redis_url:
        raise RuntimeError(
            "phase 2 needs Redis: set TASKMAN_REDIS_URL, or run `taskman serve`, "
            "which starts an embedded Redis"
        )
    return redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=2, health_check_interval=10
    )


def task_queue(settings: Settings, connection: redis.Redis) -> Queue:
    return Queue(
        settings.queue_name,
        connection=connection,
        serializer=JSONSerializer,  # never pickle: a job's data is plain JSON
        job_class=TaskJob,
    )


class _QuietCleanups(logging.Filter):
    """RQ logs each registry clean-up at INFO; ours run every few seconds."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "cleaning registries" not in record.getMessage()


def _in_scheduler_child() -> None:
    """RQ forks its scheduler from the worker (the only fork a SimpleWorker makes)."""
    # If the worker is killed in BLMOVE, the child's copy of that socket would keep
    # the dead BLMOVE waiting in Redis, and it would swallow the next job.
    close_inherited_sockets()
    # If the worker is SIGKILLed, stop too: SIGTERM makes RQ's scheduler release
    # its lock, for another worker to take over at once.
    die_with_parent(signal.SIGTERM)


def run_worker(settings: Settings, burst: bool = False) -> None:
    """Work until stopped; start over if Redis goes away (RQ's loop would quit)."""
    logging.getLogger("rq.worker").addFilter(_QuietCleanups())
    os.register_at_fork(after_in_child=_in_scheduler_child)
    # One scheduler name for this process: when we start over after Redis went
    # away, the new scheduler resumes the lock the last one may still hold.
    scheduler_name = uuid4().hex
    while True:
        connection = connect(settings)
        worker = TaskWorker(
            [task_queue(settings, connection)],
            connection=connection,
            serializer=JSONSerializer,
            job_class=TaskJob,
            heartbeat_ttl=settings.job_heartbeat_seconds,
            # Idle workers wake every 5 s (worker_ttl - 15) to heartbeat and to clean.
            worker_ttl=20,
            maintenance_interval=settings.job_heartbeat_seconds // 2,
            scheduler_name=scheduler_name,
        )
        worker.max_connection_wait_time = 2.0
        try:
            worker.work(
                burst=burst, with_scheduler=True, logging_level=settings.log_level
            )
        except redis.RedisError as error:
            log.warning("worker lost Redis (%s); starting over", error)
        # A warm shutdown (SIGTERM) of an idle worker sets only this date.
        if burst or worker._shutdown_requested_date is not None:
            return
        time.sleep(1)
