"""Engine room: phase 2's worker with fewer Redis round trips per job, and the
outcome counts /metrics reads.

RQ's loop makes ~20 round trips for a no-op job (rq 3.0), and they, not the job,
set the pace of a worker. A start and each progress report also signal a stream
of ours (FastJob), on which waits wake at once (the start in a pipeline already
sent; progress in the same round trip as its HSET). The overrides below save 13 of them (measured in docs/phase3.md,
"the engine room"); the jobs and what `rq info` and rq-dashboard show stay RQ's.
What they cost: they lean on when RQ calls which method, so an RQ upgrade is
checked by tests/test_engine_room.py (busy/idle states, `rq suspend`).
"""

import time
from typing import Any

import redis
from rq import Queue
from rq.exceptions import DeserializationError
from rq.executions import Execution
from rq.job import Job
from rq.utils import now
from rq.worker import WorkerStatus

from common.settings import Settings
from phase2_queue import worker as phase2
from phase2_queue.jobs import TYPES, TaskJob

# Outcome counters ("succeeded:echo" -> n) for /metrics, written in the same
# pipelines as RQ's own per-worker counts: no extra round trip.
OUTCOMES_KEY = "taskman:outcomes"
# How long a task's change stream outlives its last entry: a wait reads it
# within a second of each entry.
CHANGES_TTL = 60


def changes_key(task_id: str) -> str:
    """A stream of ours, one entry whenever an attempt starts or the task reports
    progress: changes that write nothing to RQ's results stream. A wait blocks on
    both (backend.py), so it wakes at once, not at the end of its slice."""
    return f"taskman:changes:{task_id}"


def signal_commands(task_id: str) -> tuple[tuple[Any, ...], ...]:
    """Add a change entry (the last one only is kept) and refresh its expiry."""
    key = changes_key(task_id)
    return (
        ("XADD", key, "MAXLEN", 1, "*", "changed", 1),
        ("EXPIRE", key, CHANGES_TTL),
    )


def signal_change(pipeline: Any, task_id: str) -> None:
    """signal_commands(), in ``pipeline``."""
    for command in signal_commands(task_id):
        pipeline.execute_command(*command)


class FastJob(TaskJob):
    """Phase 2's job, that signals its start and its progress (see changes_key)."""

    def prepare_for_execution(self, worker_name: str, pipeline: Any) -> None:
        super().prepare_for_execution(worker_name, pipeline)
        signal_change(pipeline, self.id)  # same pipeline: no extra round trip

    def save_meta(self) -> None:
        """RQ's (one HSET of the meta: progress, here), and the signal, in one
        round trip."""
        with self.connection.pipeline(transaction=False) as pipe:
            meta = self._serialize_meta()
            pipe.execute_command("HSET", self.key, "meta", meta)  # type: ignore[no-untyped-call]
            signal_change(pipe, self.id)
            pipe.execute()


class FastWorker(phase2.TaskWorker):
    """Phase 2's TaskWorker, trimmed of round trips, counting outcomes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The class RQ builds each dequeued job as (Queue.dequeue_any's job_class).
        kwargs["job_class"] = FastJob
        super().__init__(*args, **kwargs)
        self._failure = "failed"
        self._task_type = "?"
        self._worker_beat_at = self._suspension_checked_at = -1.0
        self._state_written: str | None = None

    # --- outcome counting

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        self._task_type = _task_type(job)
        return super().perform_job(job, queue, execution)

    def handle_job_failure(
        self, job: Job, queue: Queue, *args: Any, **kwargs: Any
    ) -> None:
        self._failure = "retried" if job.should_retry else "failed"
        super().handle_job_failure(job, queue, *args, **kwargs)

    def increment_successful_job_count(self, pipeline: Any = None) -> None:
        super().increment_successful_job_count(pipeline)
        self._count("succeeded", pipeline)

    def increment_failed_job_count(self, pipeline: Any = None) -> None:
        super().increment_failed_job_count(pipeline)
        self._count(self._failure, pipeline)

    def _count(self, outcome: str, pipeline: Any) -> None:
        key = f"{outcome}:{self._task_type}"
        (pipeline or self.connection).hincrby(OUTCOMES_KEY, key, 1)

    # --- fewer round trips per job

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
        and a worker that loses Redis starts over as a new worker."""
        if pipeline is None and state == self._state_written:
            return
        super().set_state(state, pipeline)
        self._state_written = state

    def cleanup_execution(
        self, job: Job, pipeline: Any, execution: Execution | None = None
    ) -> None:
        super().cleanup_execution(job, pipeline, execution)
        self.set_state(WorkerStatus.IDLE, pipeline=pipeline)

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


def run_worker(settings: Settings, burst: bool = False) -> None:
    """Phase 2's worker loop, with the FastWorker."""
    phase2.run_worker(settings, burst, worker_class=FastWorker)
