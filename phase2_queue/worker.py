"""Phase 2: the process that runs tasks, apart from the API: an RQ worker.

1. It counts attempts (for ``flaky`` and for GET) in the job's own hash (jobs.py).
2. Cancel is cooperative: a task's checkpoint() reads the job's status in Redis.
3. It runs only the registered task functions, whatever a job in Redis names.
4. It recovers a killed worker's job in seconds (recovery.py).
5. It reports an outcome only for a job still its own: not canceled meanwhile,
   not taken back while this worker was stopped.
6. It listens on three queues, high, normal and low priority, in that order,
   and takes a job into RQ's intermediate list, never off every list (taking.py);
   it keeps a task's progress in its job's meta.
"""

import logging
import os
import signal
import sys
import time
from typing import Any
from uuid import uuid4

import redis
from rq import Queue
from rq.executions import Execution
from rq.job import Job
from rq.serializers import JSONSerializer

from common.context import task_context
from common.settings import Settings
from phase2_queue.jobs import TaskJob, connect, task_queues
from phase2_queue.recovery import RecoveringWorker
from phase2_queue.scheduler import in_scheduler_child
from phase2_queue.taking import TakingQueue

log = logging.getLogger("taskman")


# RQ's worker writes a job's outcome whatever happened to the job meanwhile: over
# a DELETE that landed while the task ran (or between its dequeue and its start,
# which writes "started" over "canceled"), and, from a worker that was stopped
# (SIGSTOP) past its heartbeat, over a run that another worker has since taken
# back. Before writing one, the worker claims it, in one script: the job must not
# be canceled, must still be started by this worker, and this execution must still
# be in the started registry. The claim, a field of the job's hash, is what a
# DELETE checks (backend.py), in its transaction on the same hash: whichever lands
# first wins, and a DELETE that finds the claim answers 409.
CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
local ours = redis.call('HGET', KEYS[1], 'worker_name') == ARGV[1]
if redis.call('ZSCORE', KEYS[3], ARGV[3]) then
  if ours and status == 'started' then
    redis.call('HSET', KEYS[1], 'status', 'canceled')
  end
  return 'canceled'
end
if status ~= 'started' or not ours or not redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  return 'moved on'
end
redis.call('HSET', KEYS[1], 'reporting', ARGV[2])
return 'ours'
"""


class TaskWorker(RecoveringWorker):
    """RQ's SimpleWorker, with attempts and cooperative cancel, that reports a
    job's outcome only if the job is still this worker's to report."""

    def __init__(self, queues: list[Queue], *args: Any, **kwargs: Any) -> None:
        # Its take: into an intermediate list, on three queues too (taking.py).
        kwargs.setdefault("queue_class", TakingQueue)
        queues = [
            q if isinstance(q, TakingQueue) else TakingQueue.from_queue(q)
            for q in queues
        ]
        super().__init__(queues, *args, **kwargs)
        self._claim = self.connection.register_script(CLAIM)

    def prepare_job_execution(
        self, job: Job, remove_from_intermediate_queue: bool = False
    ) -> None:
        """RQ's; the job always leaves its queue's intermediate list (RQ's leaves
        it only on one queue: on several, its BLPOP put the job in none)."""
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        assert isinstance(job, TaskJob)
        canceled = queue.canceled_job_registry.key

        def on_progress(done: int, total: int, message: str | None) -> None:
            # RQ's documented place for what a job reports of itself: its meta.
            # save_meta() writes the meta field alone (one HSET), so it never
            # meets the keeper thread's heartbeats, which write other fields.
            if "unserialized" in job.meta:
                return  # a meta RQ could not read (a pickle, say): left as it is
            job.meta["progress"] = {"done": done, "total": total, "message": message}
            job.save_meta()  # type: ignore[no-untyped-call]

        # prepare_for_execution (inside perform_job) counts this attempt.
        with task_context(
            job.attempts + 1, lambda: self._is_canceled(job, canceled), on_progress
        ):
            performed: bool = super().perform_job(job, queue, execution)
            return performed

    def _is_canceled(self, job: Job, canceled_registry: str) -> bool:
        """Whether to stop: the job was canceled, or is no longer this worker's
        (it was taken back while this process was stopped); one round trip."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hmget(job.key, ["status", "worker_name"])
            pipe.zscore(canceled_registry, job.id)
            (status, worker), canceled = pipe.execute()
        return bool(
            canceled is not None
            or status == b"canceled"
            or worker != self.name.encode()
        )

    def _outcome_is_ours(
        self, job: Job, queue: Queue, execution: Execution | None
    ) -> bool:
        """Claim the right to write this run's outcome (see CLAIM); if the job
        has moved on, only let go of this run's execution."""
        if execution is None:
            return True  # not a run of this worker's (RQ's own clean-ups)
        keys = [
            job.key,
            queue.started_job_registry.key,
            queue.canceled_job_registry.key,
        ]
        args = [self.name, execution.composite_key, job.id]
        claim: Any = self._claim(keys=keys, args=args)
        if claim == b"ours":
            return True
        if claim != b"canceled":
            log.warning(
                "job %s %s: this run's outcome is dropped", job.id, claim.decode()
            )
        with self.connection.pipeline() as pipeline:
            # Without its execution, RQ's clean-up would quietly do nothing.
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.execute()
        return False

    def handle_job_success(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any,
        execution: Execution,
    ) -> None:
        if self._outcome_is_ours(job, queue, execution):
            super().handle_job_success(job, queue, started_job_registry, execution)

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        # A task stopped by a DELETE fails here too: not ours, so no retry.
        if self._outcome_is_ours(job, queue, execution):
            super().handle_job_failure(
                job, queue, started_job_registry, exc_string, execution=execution
            )


def run_worker(
    settings: Settings,
    burst: bool = False,
    worker_class: type[TaskWorker] = TaskWorker,
) -> None:
    """Work until stopped; start over if Redis goes away (RQ's loop would quit)."""
    os.register_at_fork(after_in_child=in_scheduler_child)
    # One scheduler name for this process: when we start over after Redis went
    # away, the new scheduler resumes the lock the last one may still hold.
    scheduler_name = uuid4().hex
    while True:
        worker: TaskWorker | None = None
        wait = 1.0
        try:
            # Inside the try: RQ's Worker() already speaks to Redis (CLIENT
            # SETNAME). Outside it, a start-over while Redis was still away (it is
            # restarting, or loading its AOF) ended the process once redis-py's
            # few retries ran out; both workers lose Redis at the same moment, and
            # with both gone every task stayed queued (issue 12, item 7).
            connection = connect(settings)
            worker = worker_class(
                # high, normal, low: RQ takes from the first that has a job.
                task_queues(settings, connection),
                connection=connection,
                serializer=JSONSerializer,
                job_class=TaskJob,
                heartbeat_ttl=settings.job_heartbeat_seconds,
                # Idle workers wake every 5 s (worker_ttl - 15) to heartbeat and clean.
                worker_ttl=20,
                maintenance_interval=settings.job_heartbeat_seconds // 2,
                scheduler_name=scheduler_name,
                reconnect=lambda: connect(settings),
            )
            worker.max_connection_wait_time = 2.0
            worker.work(
                burst=burst, with_scheduler=True, logging_level=settings.log_level
            )
        # A subclass of ConnectionError, but no outage: say which it is, never the
        # URL, and keep trying (slower) in case the password or ACL is being fixed.
        except (
            redis.AuthenticationError,
            redis.AuthenticationWrongNumberOfArgsError,
        ):
            log.error(
                "Redis authentication failed: check the user and password of "
                "TASKMAN_REDIS_URL%s",
                "" if burst else "; trying again in 5 s",
            )
            if burst:
                sys.exit(1)
            wait = 5.0
        except redis.RedisError as error:
            if burst and worker is None:
                raise  # a burst worker that never reached Redis did nothing
            log.warning("worker lost Redis (%s); starting over", error)
            # RQ's teardown failed before it stopped the worker's pubsub thread,
            # which would otherwise listen (and log) for the dead worker forever.
            if worker is not None and worker.pubsub_thread is not None:
                worker.pubsub_thread.stop()
        # No job runs until the next worker starts: a stop now ends the process
        # at once, not through the gone worker's handlers (which ask Redis for
        # its state, and raise when Redis is away).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # A warm shutdown (SIGTERM) of an idle worker sets only this date.
        stopping = worker is not None and worker._shutdown_requested_date is not None
        if burst or stopping:
            return
        time.sleep(wait)
