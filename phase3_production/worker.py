"""Engine room: phase 2's worker with fewer Redis round trips per job, and the
outcome counts /metrics reads.

RQ's loop makes ~21 round trips for a no-op job (rq 3.0), and they, not the job,
set the pace of a worker. Here a job takes 2 (counted by
tests/test_phase3_features.py, on one queue and on three; measured in
docs/phase3.md, "the engine room"):
1. one script reports the previous job's success (phase 2's outcome claim, then
   RQ's own writes, replayed) and takes the next job with its hash (jobloop.py);
2. one script starts it: RQ's two start pipelines' writes, replayed.
A success waits for the next take, or for a flush before the worker waits on an
empty queue, checks `rq suspend` or stops: microseconds in a busy loop. A
failure, a retry, a run no longer ours and a job with dependents take phase 2's
path (RQ's, behind the claim). The worker heartbeat goes at most once a second,
`rq suspend` is checked once a second. A start and each progress report also
signal a stream of ours (FastJob), on which waits wake at once.
What it costs: it leans on when RQ calls which method and on RQ's success being
only writes, so an RQ upgrade is checked by tests/test_jobloop.py (what a job
leaves, against phase 2's plain worker) and tests/test_engine_room.py (busy/idle
states, `rq suspend`); a worker killed between a success and its report leaves
the job started, and recovery runs it again, as for a kill mid-job.
"""

import logging
import time
from typing import Any, TypeVar

import redis
from rq import Queue
from rq.exceptions import DeserializationError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import BaseRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.utils import now
from rq.worker import WorkerStatus

from common.settings import Settings
from phase2_queue import worker as phase2
from phase2_queue.jobs import TYPES, TaskJob
from phase3_production.jobloop import START, FastQueue, Outbox, Outcome, captured

# Outcome counters ("succeeded:echo" -> n) for /metrics, written in the same
# pipelines as RQ's own per-worker counts: no extra round trip.
log = logging.getLogger("taskman")
Registry = TypeVar("Registry", bound=BaseRegistry)

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

    # RQ builds a registry each time it names one (three times a job), and each
    # build checks the serializer against a typing Protocol: ~10 % of a job's CPU.
    # Built without it (no check), then given it: the same registry.
    @property
    def started_job_registry(self) -> StartedJobRegistry:
        return self._registry(StartedJobRegistry)

    @property
    def finished_job_registry(self) -> FinishedJobRegistry:
        return self._registry(FinishedJobRegistry)

    def _registry(self, kind: type[Registry]) -> Registry:
        registry = kind(self.origin, connection=self.connection, job_class=type(self))
        registry.serializer = self.serializer
        return registry


class FastWorker(phase2.TaskWorker):
    """Phase 2's TaskWorker, trimmed of round trips, counting outcomes."""

    def __init__(self, queues: list[Queue], *args: Any, **kwargs: Any) -> None:
        # The class RQ builds each dequeued job as (Queue.dequeue_any's job_class).
        kwargs["job_class"] = FastJob
        # Its take: one round trip (jobloop.py); RQ wants the queues of its class.
        kwargs["queue_class"] = FastQueue
        self._outbox = Outbox()  # a success to report in the next take
        queues = [FastQueue.of(queue, self._outbox) for queue in queues]
        super().__init__(queues, *args, **kwargs)
        self._start: Any = None  # the start's writes, between its two halves
        self._replay = self.connection.register_script(START)
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

    # --- a job in three round trips: take (FastQueue), start, outcome

    def prepare_execution(self, job: Job) -> Execution:
        """RQ's (the execution, the worker busy), into the pipeline that
        prepare_job_execution() sends: one round trip for the start, not two."""
        self._start = self.connection.pipeline()
        ttl = self.get_heartbeat_ttl(job)
        execution = Execution.create(
            job, ttl, pipeline=self._start, worker_name=self.name
        )
        self.executions[execution.id] = execution
        self.set_state(WorkerStatus.BUSY, pipeline=self._start)
        return execution

    def prepare_job_execution(
        self, job: Job, remove_from_intermediate_queue: bool = False
    ) -> None:
        """RQ's, in prepare_execution()'s pipeline; the job always leaves its
        queue's intermediate list (the take put it there, on one queue or three)."""
        pipeline, self._start = self._start or self.connection.pipeline(), None
        with pipeline:  # never sent: replayed, in one script
            ttl = self.get_heartbeat_ttl(job)
            self.heartbeat(ttl, pipeline=pipeline)
            job.heartbeat(now(), ttl, pipeline=pipeline)
            job.prepare_for_execution(self.name, pipeline=pipeline)
            pipeline.persist(job.key)
            intermediate = Queue(job.origin, connection=self.connection)
            pipeline.lrem(intermediate.intermediate_queue_key, 1, job.id)
            self._replay(args=captured(pipeline))

    def handle_job_success(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: StartedJobRegistry,
        execution: Execution,
    ) -> None:
        """RQ's success writes, reported with phase 2's claim in the round trip
        that takes the next job (jobloop.py), or in a flush before the worker
        waits or stops. The writes are RQ's (its handle_job_success, less the
        WATCH and the dependents): a job that has dependents, repeats or a rate
        limit takes phase 2's path, as does a run no longer ours, to let go of it."""
        if job.repeats_left or job.has_rate_limit:
            super().handle_job_success(job, queue, started_job_registry, execution)
            return
        with self.connection.pipeline() as writes:  # never sent
            self.increment_successful_job_count(pipeline=writes)
            assert job.ended_at and job.started_at
            self.increment_total_working_time(job.ended_at - job.started_at, writes)
            result_ttl = job.get_result_ttl(self.default_result_ttl)
            if result_ttl != 0:
                job._handle_success(
                    result_ttl,
                    pipeline=writes,
                    worker_name=self.name,
                    execution_id=execution.id,
                    execution_started_at=execution.created_at,
                    execution_ended_at=job.ended_at,
                )
            job.cleanup(result_ttl, pipeline=writes, remove_from_queue=False)
            self.cleanup_execution(job, pipeline=writes, execution=execution)
            keys = [
                job.key,
                queue.started_job_registry.key,
                queue.canceled_job_registry.key,
                job.dependents_key,
            ]
            args = [self.name, execution.composite_key, job.id, *captured(writes)]

        def refused() -> None:  # not written: phase 2's path claims again
            phase2.TaskWorker.handle_job_success(
                self, job, queue, started_job_registry, execution
            )

        self._report()  # never two pending
        self._outbox.pending = Outcome(keys, args, refused)
        job._status = JobStatus.FINISHED
        self.log.info("Successfully completed job %s on worker %s", job.id, self.name)

    def _report(self) -> None:
        """Send the pending success, if any, in a round trip of its own."""
        if self._outbox.pending is not None:
            self._outbox.run(self.connection)

    def teardown(self) -> None:
        try:
            self._report()
        except redis.RedisError as error:
            # Its job stays started; its heartbeat expires, and recovery requeues it.
            log.warning("the last job's outcome was not written: %s", error)
        super().teardown()  # type: ignore[no-untyped-call]

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
        self._report()  # a suspended worker waits: not with an outcome unsent
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
