"""Phase 2: the process that runs tasks, apart from the API: an RQ worker.

1. It counts attempts (for ``flaky`` and for GET) in the job's own hash (jobs.py).
2. Cancel is cooperative: a task's checkpoint() reads the job's status in Redis.
3. It runs only the registered task functions, whatever a job in Redis names.
4. It recovers a killed worker's job in seconds (recovery.py).
"""

import logging
import os
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
from phase2_queue.jobs import TaskJob, connect, task_queue
from phase2_queue.recovery import RecoveringWorker, in_scheduler_child

log = logging.getLogger("taskman")


class TaskWorker(RecoveringWorker):
    """RQ's SimpleWorker, with attempts and cooperative cancel."""

    _canceled = False  # set by the running task's last checkpoint()

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        assert isinstance(job, TaskJob)
        self._canceled = False
        # prepare_for_execution (inside perform_job) counts this attempt.
        with task_context(job.attempts + 1, lambda: self._is_canceled(job)):
            performed: bool = super().perform_job(job, queue, execution)
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
        execution: Execution | None = None,
    ) -> None:
        if self._canceled:
            # It stopped because DELETE canceled it: not a failure, no retry.
            # (Without its execution, RQ's clean-up would quietly do nothing.)
            with self.connection.pipeline() as pipeline:
                self.cleanup_execution(job, pipeline=pipeline, execution=execution)
                pipeline.execute()
            return
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
            # Inside the try: RQ's Worker() already speaks to Redis.
            connection = connect(settings)
            worker = worker_class(
                [task_queue(settings, connection)],
                connection=connection,
                serializer=JSONSerializer,
                job_class=TaskJob,
                heartbeat_ttl=settings.job_heartbeat_seconds,
                # Idle workers wake every 5 s (worker_ttl - 15) to heartbeat and clean.
                worker_ttl=20,
                maintenance_interval=settings.job_heartbeat_seconds // 2,
                scheduler_name=scheduler_name,
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
        # A warm shutdown (SIGTERM) of an idle worker sets only this date.
        stopping = worker is not None and worker._shutdown_requested_date is not None
        if burst or stopping:
            return
        time.sleep(wait)
