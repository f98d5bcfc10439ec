"""Phase 2: crash recovery in seconds, not RQ's minutes.

RQ finds a dead worker's job when the job's heartbeat key has expired (minutes, by
default) and a worker's maintenance runs (every 10 minutes). Here:
1. a keeper thread beats the running job's heartbeat with a short TTL and runs
   RQ's registry clean-up every few seconds, which requeues (or, its retries
   spent, fails) a killed worker's job;
2. a job taken off the queue by a worker that died before starting it goes back
   after one heartbeat TTL (RQ's own rescue takes a minute and counts an attempt);
3. the scheduler (delayed retries, scheduler.py) rides out Redis outages, and a
   dead owner's lock is freed in seconds, not RQ's 61;
4. a job that another client wrote and RQ cannot read or write back is failed on
   its own (jobs.py's fail_unreadable): the worker goes on with the others;
5. a worker stopped (SIGSTOP) past its heartbeat and woken again goes back into
   RQ's worker registry (worker.py drops the outcome of the job it lost).
"""

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any
from uuid import uuid4

import redis
from rq import Queue, SimpleWorker, worker_registration
from rq.executions import Execution
from rq.group import Group
from rq.job import Job
from rq.registry import clean_registries
from rq.scheduler import RQScheduler
from rq.utils import now, utcformat

from phase2_queue.jobs import fail_unreadable
from phase2_queue.scheduler import (
    FREE_STALE_LOCK,
    SCHEDULER_LOCK_TTL,
    SCHEDULER_STOP_SECONDS,
    STALE_SCHEDULER_SECONDS,
    TaskScheduler,
)

log = logging.getLogger("taskman")

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


class RecoveringWorker(SimpleWorker):
    """SimpleWorker (no fork per job: ~2.5x the forking Worker on a no-op job)
    that notices a dead worker's job within ``heartbeat_ttl`` seconds."""

    def __init__(
        self,
        *args: Any,
        heartbeat_ttl: int = 10,
        scheduler_name: str | None = None,
        reconnect: Callable[[], redis.Redis] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.heartbeat_ttl = heartbeat_ttl
        self.reconnect = reconnect  # how its scheduler connects (scheduler.py)
        self.scheduler_name = scheduler_name or uuid4().hex
        # The job being run and its execution, for the keeper to beat.
        self._running: tuple[Job, Execution] | None = None
        self._job_beat_at = 0.0
        self._lock = threading.Lock()
        self._stop_keeper = threading.Event()
        self._dead = False  # registered its death: never register again
        self._rescue = self.connection.register_script(RESCUE)
        self._free_stale_lock = self.connection.register_script(FREE_STALE_LOCK)

    def work(self, *args: Any, **kwargs: Any) -> bool:
        keeper = threading.Thread(target=self._keep, name="keeper", daemon=True)
        keeper.start()
        try:
            worked: bool = super().work(*args, **kwargs)
            return worked
        finally:
            self._stop_keeper.set()
            keeper.join()

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's, going on past a job it cannot read (a date that is no date, say,
        that another client wrote): RQ's raises, and its worker quits, every time
        it meets that job again. Here the job is failed, and the next one taken."""
        while True:
            try:
                dequeued: tuple[Job, Queue] | None
                dequeued = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
                return dequeued
            except redis.RedisError:
                raise
            except Exception as error:
                # RQ's dequeue names the job and its queue on the error.
                job_id, queue = (
                    getattr(error, "job_id", None),
                    getattr(error, "queue", None),
                )
                if job_id is None or not isinstance(queue, Queue):
                    raise
                with self.connection.pipeline() as pipe:
                    pipe.lrem(queue.intermediate_queue_key, 1, job_id)
                    fail_unreadable(queue, job_id, error, pipe)
                    pipe.execute()

    # --- short heartbeats, beaten by the keeper while the job runs

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_ttl

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """RQ's, with the job and its execution shown to the keeper while it runs
        (here: prepare_job_execution() is not given the execution)."""
        with self._lock:
            self._running, self._job_beat_at = (job, execution), time.monotonic()
        try:
            performed: bool = super().perform_job(job, queue, execution)
            return performed
        finally:
            with self._lock:  # even if RQ's bookkeeping raised
                self._running = None

    def cleanup_execution(
        self, job: Job, pipeline: Any, execution: Execution | None = None
    ) -> None:
        with self._lock:  # no heartbeat may land after the execution is gone
            self._running = None
        super().cleanup_execution(job, pipeline, execution)

    def _keep(self) -> None:
        last_cleanup = time.monotonic()
        while not self._stop_keeper.wait(min(1.0, self.heartbeat_ttl / 4)):
            _keeping(self._beat)
            due = time.monotonic() - last_cleanup > self.maintenance_interval
            if due and _keeping(self._clean_started_jobs):
                _keeping(self._stay_registered)
                last_cleanup = time.monotonic()

    def _beat(self) -> None:
        with self._lock:
            due = time.monotonic() - self._job_beat_at > self.heartbeat_ttl / 3
            if self._running is not None and due:
                self.maintain_heartbeats(*self._running)
                self._job_beat_at = time.monotonic()

    def _stay_registered(self) -> None:
        """Back into RQ's worker registry if dropped from it. A worker stopped
        (SIGSTOP) or starved past its key's TTL loses the key, and any worker's
        clean-up then drops it from the registry; RQ's heartbeat makes the key
        again but never the entry, so the worker would work unseen by `rq info`,
        rq-dashboard and /health."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.sismember(self.redis_workers_keys, self.key)
            pipe.hexists(self.key, "birth")
            registered, born = pipe.execute()
        if registered and born:
            return
        # A Redis restart that lost the last second (appendfsync everysec), or
        # all of it, drops the entry too. Never after register_death (below): a
        # ghost for 80 s; nor before birth (serialize() needs it).
        with self._lock:
            if self._dead or self.birth_date is None:
                return
            log.warning("worker %s was dropped from the registry; back in", self.name)
            with self.connection.pipeline() as pipe:
                pipe.hset(
                    self.key, mapping={**self.serialize(), "state": self.get_state()}
                )
                worker_registration.register(self, pipe)
                pipe.expire(self.key, self.worker_ttl + 60)
                pipe.execute()

    def register_death(self) -> None:
        with self._lock:
            self._dead = True
            super().register_death()  # type: ignore[no-untyped-call]

    # --- frequent clean-up

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

    def clean_group_registries(self) -> None:
        """RQ's (the main loop's other clean-up, of job groups, which we do not
        use), without its INFO line: RQ's maintenance comes every 10 minutes, ours
        every few seconds, and the line would fill the worker's log."""
        lock_timeout = max(int(self.maintenance_interval) - 1, 1)
        if Group.acquire_maintenance_lock(self.connection, lock_timeout):
            Group.clean_registries(connection=self.connection)

    @contextmanager
    def _maintenance_lock(self, queue: Queue) -> Iterator[bool]:
        """RQ's clean-up lock, for two heartbeat TTLs rather than RQ's 899 s: a
        worker killed while cleaning, or one that lost Redis before its release
        (a failover: tests/test_failover.py), would otherwise stop every clean-up,
        and with it every rescue, for 15 minutes. A clean-up takes milliseconds."""
        key = queue.registry_cleaning_key
        ttl = 2 * self.heartbeat_ttl
        ours = bool(self.connection.set(key, self.name, nx=True, ex=ttl))
        try:
            yield ours
        finally:
            if ours:
                self.connection.delete(key)

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

    # --- a scheduler that survives

    def _free_stale_scheduler_lock(self, queue: Queue) -> None:
        key = RQScheduler.get_locking_key(queue.name)
        fresh = SCHEDULER_LOCK_TTL - STALE_SCHEDULER_SECONDS
        if self._free_stale_lock(keys=[key], args=[fresh]):
            log.warning("freed the scheduler lock of a scheduler that is gone")

    def stop_scheduler(self) -> None:
        """RQ's (SIGTERM, then wait for the scheduler process), with a bound on
        the wait: RQ's has none. A scheduler that never stops (forked while
        another thread held a lock it then needs, its stderr's, say) would hold
        this worker in its teardown forever, taking no job, never starting over.
        Killed, it leaves its lock, freed in STALE_SCHEDULER_SECONDS."""
        process = self.scheduler._process if self.scheduler else None
        if process is None or not process.pid:
            return
        with suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(SCHEDULER_STOP_SECONDS)
        if process.is_alive():
            log.warning("the scheduler did not stop in time; killing it")
            process.kill()
            process.join()

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
            reconnect=self.reconnect,
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


def _keeping(step: Callable[[], None]) -> bool:
    """Run one of the keeper's steps; whether it went through. Whatever it raises,
    the keeper goes on: one that died (a TypeError from an RQ whose hooks changed,
    say) would stop the beats, and a running job would be taken for abandoned."""
    try:
        step()
        return True
    except redis.RedisError as error:
        log.warning("worker keeper: %s", error)
    except Exception:
        log.exception("worker keeper: %s failed; going on", step.__name__)
    return False
