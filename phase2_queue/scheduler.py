"""Phase 2: RQ's scheduler, made to survive: it moves delayed retries to the queue
when due, so while it is down every retry waits.

RQ's dies at the first Redis error and keeps its lock for a minute; one job RQ
cannot read stops every move. The worker (recovery.py) starts this one instead,
frees a dead owner's lock in seconds and bounds the wait for it to stop.
"""

import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.scheduler import RQScheduler
from rq.utils import current_timestamp

from common.process import close_inherited_sockets, die_with_parent
from phase2_queue.jobs import TaskJob, fail_unreadable

log = logging.getLogger("taskman")

# RQ's scheduler holds its lock for 61 s (interval + 60) and refreshes it every
# second. A worker that dies after taking the lock and before its scheduler runs
# (or a scheduler that dies without letting go) leaves it taken that long, every
# delayed retry waiting. A lock not refreshed for STALE_SCHEDULER_SECONDS has no
# live owner: free it, in one script, for a live worker to take.
SCHEDULER_LOCK_TTL = 61
STALE_SCHEDULER_SECONDS = 10
# A scheduler told to stop finishes its 1 s sleep, releases its lock and says
# goodbye. Killed before it let go (Redis away, say), its lock is freed anyway.
SCHEDULER_STOP_SECONDS = 5
FREE_STALE_LOCK = """
local ttl = redis.call('TTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class TaskScheduler(RQScheduler):
    """RQ's scheduler (a process the worker forks; it moves delayed retries to
    the queue when due), made to ride out a Redis outage. RQ's dies at the first
    connection error, and its lock stays taken for a minute (its TTL): every
    delayed retry waits that long unless its worker lives to restart it."""

    def __init__(
        self,
        *args: Any,
        reconnect: Callable[[], redis.Redis] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._reconnect = reconnect

    @property
    def connection(self) -> redis.Redis:
        """Given ``reconnect`` (the worker's connect(settings)), a client of its
        own made the way every other is. RQ's rebuilds one from the worker's
        pool's settings, in the forked process; a Sentinel pool's settings hold
        the parent's sentinel clients, whose sockets in_scheduler_child closed
        (their numbers free to be reused by the next socket opened)."""
        if self._connection is None and self._reconnect is not None:
            self._connection = self._reconnect()  # type: ignore[assignment]
        connection: redis.Redis = super().connection
        return connection

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

    def enqueue_scheduled_jobs(self) -> None:
        """RQ's, which moves every due job in one pipeline: one job that RQ's Job
        cannot read or write back (another client's meta of the wrong shape, say)
        makes it raise, nothing moves, and every delayed retry waits for as long
        as that job stays. Then: the due jobs one by one, as our TaskJob (which
        reads what RQ's Job cannot), and one that cannot be moved even so failed
        on its own."""
        try:
            super().enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]
        except redis.RedisError:
            raise
        except Exception as error:
            self.log.warning("scheduler: %r; moving the due jobs one by one", error)
            for registry in self._scheduled_job_registries:
                queue = Queue(
                    registry.name,
                    connection=self.connection,
                    serializer=self.serializer,
                    job_class=TaskJob,
                )
                for job_id in registry.get_jobs_to_schedule(current_timestamp()):
                    self._enqueue_one(registry, queue, job_id)

    def _enqueue_one(self, registry: Any, queue: Queue, job_id: str) -> None:
        with self.connection.pipeline() as pipe:
            try:
                job = TaskJob.fetch(
                    job_id, connection=self.connection, serializer=self.serializer
                )
                # First in the pipeline: it may WATCH (for dependencies).
                queue.enqueue_job(job, pipeline=pipe)
            except NoSuchJobError:
                pass  # gone: out of the registry, as RQ's does
            except redis.RedisError:
                raise
            except Exception as error:
                pipe.reset()
                fail_unreadable(queue, job_id, error, pipe)
            registry.remove(job_id, pipeline=pipe)
            pipe.execute()


def in_scheduler_child() -> None:
    """RQ forks its scheduler from the worker (the only fork a SimpleWorker makes):
    pass this to ``os.register_at_fork(after_in_child=...)``."""
    # If the worker is killed in BLMOVE, the child's copy of that socket would keep
    # the dead BLMOVE waiting in Redis, and it would swallow the next job.
    close_inherited_sockets()
    # If the worker is SIGKILLed, stop too: SIGTERM makes RQ's scheduler release
    # its lock, for another worker to take over at once.
    die_with_parent(signal.SIGTERM)
