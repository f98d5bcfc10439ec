"""Phase 2: the process that runs tasks, a stock RQ worker with three additions.

1. It counts attempts (for ``flaky`` and for GET) in the job's own hash.
2. Cancel is cooperative: a task's checkpoint() reads the job's status in Redis.
3. A worker SIGKILLed mid-task is noticed in seconds, not RQ's ~90 s + 600 s: a
   keeper thread beats the job's heartbeat with a short TTL and runs RQ's own
   registry clean-up often, which re-queues (or fails) the abandoned job.
"""

import logging
import threading
import time
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer

from common.context import task_context
from common.settings import Settings

log = logging.getLogger("taskman")

# Outcome counters ("succeeded:echo" -> n) for /metrics, written in the same
# pipelines as RQ's own per-worker counts: no extra round trip.
OUTCOMES_KEY = "taskman:outcomes"


class TaskJob(Job):
    """An RQ job that counts its attempts in one extra field of its hash."""

    attempts: int = 0

    def restore(self, raw_data: dict[Any, Any]) -> Any:
        restored = super().restore(raw_data)
        self.attempts = int(raw_data.get(b"attempts") or raw_data.get("attempts") or 0)
        return restored

    def prepare_for_execution(self, worker_name: str, pipeline: Any) -> None:
        super().prepare_for_execution(worker_name, pipeline)
        # Same pipeline as RQ's own bookkeeping: no extra round trip.
        pipeline.hincrby(self.key, "attempts", 1)


class TaskWorker(SimpleWorker):
    """SimpleWorker (no fork per job: ~2.5x the forking Worker on a no-op job)."""

    def __init__(self, *args: Any, heartbeat_ttl: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heartbeat_ttl = heartbeat_ttl
        self._running: Job | None = None
        self._last_beat = 0.0
        self._lock = threading.Lock()
        self._canceled = False
        self._failure = "failed"
        self._task_type = "?"
        self._stop_keeper = threading.Event()

    # --- attempts and cooperative cancel

    def perform_job(self, job: Job, queue: Queue) -> bool:
        assert isinstance(job, TaskJob)
        self._canceled = False
        # Function names are the registered type names (common.tasks.echo -> echo).
        self._task_type = (job.func_name or "?").rsplit(".", 1)[-1]
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

    # --- short heartbeats, frequent clean-up

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.heartbeat_ttl

    def prepare_job_execution(self, job: Job, *args: Any, **kwargs: Any) -> None:
        super().prepare_job_execution(job, *args, **kwargs)
        with self._lock:
            self._running, self._last_beat = job, time.monotonic()

    def cleanup_execution(self, job: Job, pipeline: Any) -> None:
        with self._lock:  # no heartbeat may land after the execution is gone
            self._running = None
        super().cleanup_execution(job, pipeline)

    def _keep(self) -> None:
        while not self._stop_keeper.wait(min(1.0, self.heartbeat_ttl / 4)):
            try:
                with self._lock:
                    due = time.monotonic() - self._last_beat > self.heartbeat_ttl / 3
                    if self._running is not None and due and self.execution:
                        self.maintain_heartbeats(self._running)
                        self._last_beat = time.monotonic()
                if self.should_run_maintenance_tasks:
                    self.clean_registries()  # type: ignore[no-untyped-call]
            except redis.RedisError as error:
                log.warning("worker keeper: %s", error)

    def work(self, *args: Any, **kwargs: Any) -> bool:
        keeper = threading.Thread(target=self._keep, name="keeper", daemon=True)
        keeper.start()
        try:
            worked: bool = super().work(*args, **kwargs)
            return worked
        finally:
            self._stop_keeper.set()
            keeper.join()


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


def run_worker(settings: Settings, burst: bool = False) -> None:
    """Work until stopped; start over if Redis goes away (RQ's loop would quit)."""
    logging.getLogger("rq.worker").addFilter(_QuietCleanups())
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
