"""Phase 2: how an RQ job reads as a task: its status, result, end, progress,
priority and due time, from the job's hash and its latest result.

GET, the list and the waits all read jobs through here, so a task looks the same
whichever route shows it.
"""

import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import ValidationError
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry
from rq.results import Result

from common.models import Progress, Task, TaskStatus
from common.tasks import describe_traceback
from phase2_queue.jobs import TYPES, TaskJob, priority_of

log = logging.getLogger("taskman")

T = TypeVar("T")

STATUSES = {
    JobStatus.QUEUED: TaskStatus.QUEUED,
    JobStatus.DEFERRED: TaskStatus.QUEUED,
    JobStatus.SCHEDULED: TaskStatus.SCHEDULED,  # or retrying: see to_task()
    JobStatus.STARTED: TaskStatus.RUNNING,
    JobStatus.FINISHED: TaskStatus.SUCCEEDED,
    JobStatus.FAILED: TaskStatus.FAILED,
    JobStatus.STOPPED: TaskStatus.FAILED,
    JobStatus.CANCELED: TaskStatus.CANCELED,
}


# What reading a job that another client wrote (or damaged) can raise: RQ's
# DeserializationError for data no JSON decoder reads; ValueError (pydantic's
# ValidationError is one) or TypeError and the like for a field of the wrong
# shape (a date that is not a date, a payload that is not an object). Such a job
# is not one of our tasks: 404, never a 500.
UNREADABLE = (DeserializationError, ValueError, TypeError, AttributeError, KeyError)


def to_task(
    job: TaskJob, latest: Result | None, ended_score: float | None = None
) -> Task:
    """The task a job is; ``ended_score``: the job's score in ``end_registry()``'s
    registry, when that names one."""
    status = STATUSES.get(job.get_status(refresh=False), TaskStatus.QUEUED)
    if status in (TaskStatus.QUEUED, TaskStatus.SCHEDULED) and job.attempts:
        # Back in the queue, or waiting for a delayed retry, after a failed attempt.
        status = TaskStatus.RETRYING
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
        priority=priority_of(job.origin),
        run_at=_meta_field(job.meta, "run_at", _run_at),
        progress=_meta_field(job.meta, "progress", Progress.model_validate),
    )


def _run_at(value: Any) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


def _meta_field(meta: Any, name: str, read: Callable[[Any], T]) -> T | None:
    """A field of ours in the job's meta (``run_at``, ``progress``), or None if it
    is absent or not of its shape (another client's meta may hold anything)."""
    value = meta.get(name) if isinstance(meta, dict) else None
    if value is None:
        return None
    try:
        return read(value)
    except (ValidationError, ValueError, TypeError):
        return None


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
