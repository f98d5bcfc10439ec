"""Phase 2: how a worker takes a job, so that a job is never off every list.

RQ's worker on one queue takes with ``BLMOVE`` into the queue's intermediate
list, where the clean-up (recovery.py) finds a job whose worker died before it
started it. On several queues RQ waits in ``BLPOP`` instead, which takes the id
off its queue and puts it nowhere until the worker writes the start: a worker
SIGKILLed in that instant (tests/test_supervision.py kills them right after a
submit), or a failover that replicated the pop but not the start, leaves the job
``queued`` on no list, and nothing ever runs it.

Here every take is RQ's own one-queue move, ``Queue.lmove`` (``LMOVE`` into the
intermediate list), tried on each queue in order: high, normal, low. With every
queue empty, the worker waits on the normal queue, where most tasks go, with
``BLMOVE`` from that list to itself: a rotation of one element, head to head,
which changes nothing and takes nothing, but returns as soon as the list has a
job. A job pushed on the high or low queue while every worker waits is seen within
``LOOK_AGAIN_SECONDS``. Phase 3's idle worker waits on a wake stream instead
(phase3_production/jobloop.py), which its own enqueue writes.
"""

import time
from collections.abc import Iterable
from typing import Any, Self

import redis
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.utils import as_text

from common.models import Priority
from phase2_queue.jobs import priority_of

# How long an idle worker waits on the normal queue before it looks at the
# others again: the most a high or low job waits for an idle worker.
LOOK_AGAIN_SECONDS = 0.1


class TakingQueue(Queue):
    """RQ's queue, whose ``dequeue_any`` (which RQ's worker calls) always moves
    the job it takes into an intermediate list."""

    @classmethod
    def from_queue(cls, queue: Queue) -> Self:
        """The same queue, of this class."""
        return cls(
            queue.name,
            connection=queue.connection,
            serializer=queue.serializer,
            job_class=queue.job_class,
        )

    @classmethod
    def dequeue_any(
        cls,
        queues: Iterable[Queue],
        timeout: int | None,
        connection: redis.Redis | None = None,
        job_class: type[Job] | None = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Queue] | None:
        listened = list(queues)
        assert connection is not None  # RQ's worker always gives its own
        normal = next(
            (q for q in listened if priority_of(q.name) is Priority.NORMAL),
            listened[0],
        )
        deadline = time.monotonic() + (timeout or 0)
        while True:
            for queue in listened:  # high, normal, low: RQ's one-queue LMOVE
                while (moved := cls.lmove(connection, queue.key, None)) is not None:
                    queue_key, job_id = map(as_text, moved)
                    fetched = cls._fetch_dequeued_job(
                        connection,
                        queue_key,
                        job_id,
                        job_class=job_class,
                        serializer=serializer,
                        death_penalty_class=death_penalty_class,
                    )
                    if fetched is not None:
                        return fetched
                    # The job is gone (RQ's dequeue skips it): out of the list.
                    connection.lrem(queue.intermediate_queue_key, 1, job_id)
            left = wait_left(timeout, deadline, listened)
            if left is None:
                return None
            wait = min(left, LOOK_AGAIN_SECONDS)
            # redis-py types the timeout as whole seconds; Redis takes a fraction.
            connection.blmove(normal.key, normal.key, wait, "LEFT", "LEFT")  # type: ignore[arg-type]


def wait_left(
    timeout: int | None, deadline: float, queues: list[Queue]
) -> float | None:
    """How long an idle take may still wait: None in burst mode (no wait, as
    RQ's); DequeueTimeout, which RQ's worker loop expects, once it is over."""
    if timeout is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DequeueTimeout(timeout, [q.key for q in queues])
    return left
