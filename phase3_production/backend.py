"""Phase 3: phase 2's RQ backend, its hot paths rebuilt in the engine room.

The jobs are the same plain RQ jobs; only the way to Redis changes. POST, and a
whole batch, is one script (enqueue.py); GET one round trip for the job and its
latest result; a page of GET /tasks one for the index and one for every job on
it: all from the event loop (redis_client.py) and batched with other requests'
(autopipeline.py): no thread hand-off, no RQ objects built to be thrown away.
A wait blocks on RQ's results stream on connections of its own. DELETE, rare and
subtle, stays phase 2's.
"""

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

from rq import Queue
from rq.results import Result
from rq.serializers import JSONSerializer

from common.backend import IdempotencyConflict
from common.listing import GONE, TaskQuery, page_of
from common.models import BatchCreate, Task, TaskCreate, TaskPage, new_task
from common.settings import Settings
from phase2_queue.backend import (
    UNREADABLE,
    RQBackend,
    end_registry,
    live_workers,
    not_a_task,
    to_task,
)
from phase2_queue.jobs import TaskJob, queue_names
from phase2_queue.outages import unavailable_when_redis_is_down
from phase2_queue.replicas import wait_command
from phase3_production.autopipeline import AutoPipeline
from phase3_production.enqueue import Enqueue
from phase3_production.redis_client import connect_async
from phase3_production.worker import changes_key, signal_commands

# A wait blocks this long at a time, then reads the job again. Phase 2 wakes
# four times a second to catch progress and starts, which write no result; here
# the change stream (worker.py) wakes a wait on those, so a slice only bounds
# what a worker of phase 2 on these queues (which signals nothing) shows late.
WAIT_SLICE = 1.0
# Waits blocked at once, each on a connection of its own (a blocking XREAD holds
# its connection). Past this, a wait queues for a free connection, still within
# its own timeout; the requests' pool is never touched.
MAX_WAITS = 256


class FastRQBackend(RQBackend):
    """Phase 2's backend with the engine room's submit, get, wait, list and health."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.redis = connect_async(settings)
        # The cache reads through it too; WAIT: see phase2_queue/replicas.py.
        self.batch = AutoPipeline(self.redis, wait=wait_command(settings))
        self._enqueue_script = Enqueue(settings, self.batch)
        # Blocking reads never go through the auto-pipeline: one XREAD BLOCK in a
        # batch would hold back every other request's reply behind it.
        self._wait_client = connect_async(settings, timeout=WAIT_SLICE + 5)
        self._wait_slots = asyncio.Semaphore(MAX_WAITS)

    @property
    def queue(self) -> Queue:
        """RQ's queue (normal priority), for the outcome counts' connection."""
        return self._queue

    def queue_depth(self) -> int:
        """Tasks waiting in the three queues, for the metrics; blocking (sync)."""
        with self._redis.pipeline(transaction=False) as pipe:
            for name in queue_names(self._settings):
                pipe.llen(f"rq:queue:{name}")
            return sum(pipe.execute())

    async def submit(
        self, request: TaskCreate, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        fingerprint = request.fingerprint() if idempotency_key else ""
        tasks, created = await self._submit_all([request], fingerprint, idempotency_key)
        return tasks[0], created

    async def submit_many(
        self, requests: list[TaskCreate], idempotency_key: str | None = None
    ) -> tuple[list[Task], bool]:
        # The key covers the batch: its fingerprint is the whole batch's, so a key
        # used for one task and then for a batch (or another batch) is a 409.
        # Built from requests validated already: no validator runs again (~7 ms
        # for 100 tasks).
        batch = BatchCreate.model_construct(tasks=requests)
        fingerprint = batch.fingerprint() if idempotency_key else ""
        return await self._submit_all(requests, fingerprint, idempotency_key)

    async def _submit_all(
        self, requests: list[TaskCreate], fingerprint: str, idempotency_key: str | None
    ) -> tuple[list[Task], bool]:
        """One script call for every task (enqueue.py); the key's record is the
        fingerprint and the ids, in order."""
        tasks = [new_task(r, self._settings.max_retries) for r in requests]
        key = f"taskman:idempotency:{idempotency_key}" if idempotency_key else ""
        record = " ".join([fingerprint, *(task.id for task in tasks)])
        with unavailable_when_redis_is_down():
            earlier = await self._enqueue_script(tasks, key, record)
        if not earlier:
            return tasks, True
        earlier_fingerprint, *earlier_ids = earlier.decode().split(" ")
        if earlier_fingerprint != fingerprint:
            raise IdempotencyConflict("Idempotency-Key was used with another body")
        found = await asyncio.gather(*(self.get(i) for i in earlier_ids))
        if all(task is not None for task in found):
            return [task for task in found if task is not None], False
        # A first task has expired: forget the key and start afresh.
        with unavailable_when_redis_is_down():
            await self.redis.delete(key)
        return await self._submit_all(requests, fingerprint, idempotency_key)

    async def get(self, task_id: str) -> Task | None:
        return await self._fetch(task_id)

    async def wait(
        self, task_id: str, timeout: float, seen: Task | None = None
    ) -> Task | None:
        """Phase 2's wait on RQ's results stream, from the event loop, and on the
        task's change stream (worker.py: a start, progress, a cancel), so that
        it wakes at once on those too. XREAD BLOCK from the entries this read
        saw: one written between the read and the block still wakes it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with unavailable_when_redis_is_down():
                raw, results, changes = await self.batch.execute_commands(
                    *_reads(task_id), _latest(changes_key(task_id))
                )
            task = await self._decode(task_id, raw, results)
            left = deadline - loop.time()
            if task is None or task.status.finished or task != seen or left <= 0:
                return task
            streams = {
                f"rq:results:{task_id}": _entry(results),
                changes_key(task_id): _entry(changes),
            }
            await self._block_on(streams, min(left, WAIT_SLICE))

    async def _block_on(self, streams: dict[str, bytes], seconds: float) -> None:
        """Until an entry newer than the given lands in one of ``streams``, or
        ``seconds`` pass."""
        try:
            async with asyncio.timeout(seconds):
                await self._wait_slots.acquire()
        except TimeoutError:
            return  # every wait connection is busy: read the job again
        try:
            with unavailable_when_redis_is_down():
                await self._wait_client.xread(
                    streams,  # type: ignore[arg-type]
                    count=1,
                    block=max(1, int(seconds * 1000)),
                )
        finally:
            self._wait_slots.release()

    async def list(self, query: TaskQuery) -> TaskPage:
        """Phase 2's page from the index (common/listing.py's page_of), in two
        round trips: the page's members, then every job on it and its latest
        result."""
        newest = f"({query.after}" if query.after else "+"
        with unavailable_when_redis_is_down():
            members: list[bytes] = await self.batch.execute_command(
                "ZREVRANGEBYLEX", self._index, newest, "-", "LIMIT", 0, query.budget
            )
            ids = [member.decode().partition(":")[2] for member in members]
            replies = await self.batch.execute_commands(
                *itertools.chain.from_iterable(_reads(task_id) for task_id in ids)
            )
        found = [
            GONE if not raw else await self._decode(task_id, raw, results)
            for task_id, raw, results in zip(
                ids, replies[::2], replies[1::2], strict=True
            )
        ]
        page, gone = page_of(query, [m.decode() for m in members], found)
        if gone:
            with unavailable_when_redis_is_down():
                await self.batch.execute_command("ZREM", self._index, *gone)
        return page

    async def _fetch(self, task_id: str) -> Task | None:
        with unavailable_when_redis_is_down():
            # One round trip, shared with other requests' (see autopipeline.py).
            raw, results = await self.batch.execute_commands(*_reads(task_id))
        return await self._decode(task_id, raw, results)

    async def _decode(
        self, task_id: str, raw: dict[bytes, bytes], results: Sequence[Any]
    ) -> Task | None:
        """What Job.fetch() and job.latest_result() make of these replies."""
        if not raw or b"data" not in raw:
            return None
        job = TaskJob(task_id, connection=self._redis, serializer=JSONSerializer)
        try:
            job.restore(raw)
            latest = None
            if results:
                result_id, payload = results[0]
                latest = Result.restore(
                    task_id,
                    result_id.decode(),
                    payload,
                    connection=self._redis,
                    serializer=JSONSerializer,
                )
            ended = None
            registry = end_registry(job, latest)
            if registry:  # rare: a job plain RQ canceled, say (see end_registry)
                with unavailable_when_redis_is_down():
                    (score,) = await self.batch.execute_commands(
                        ("ZSCORE", registry, task_id)
                    )
                ended = None if score is None else float(score)
            return to_task(job, latest, ended)
        except UNREADABLE as error:  # another client's job, or a damaged one
            return not_a_task(task_id, error)

    async def cancel(self, task_id: str) -> Task | None:
        """Phase 2's cancel; then the change signal, for the waits."""
        task = await super().cancel(task_id)
        if task is not None:
            with unavailable_when_redis_is_down():
                await self.batch.execute_commands(*signal_commands(task_id))
        return task

    async def health(self) -> dict[str, Any]:
        with unavailable_when_redis_is_down():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.ping()
                for name in queue_names(self._settings):
                    pipe.llen(f"rq:queue:{name}")
                pipe.smembers(f"rq:workers:{self._settings.queue_name}")
                _, *queued, workers = await pipe.execute()
            async with self.redis.pipeline(transaction=False) as pipe:
                for worker in workers:  # the members are the workers' keys
                    pipe.hget(worker, "last_heartbeat")
                beats = await pipe.execute()
        return {"redis": "ok", "queued": sum(queued), "workers": live_workers(beats)}

    async def aclose(self) -> None:
        await self.batch.aclose()
        await self.redis.aclose()
        await self._wait_client.aclose()
        await super().aclose()


def _latest(stream: str) -> tuple[Any, ...]:
    return ("XREVRANGE", stream, "+", "-", "COUNT", 1)


def _entry(reply: Sequence[Any]) -> bytes:
    """The id of a stream's latest entry, from XREVRANGE's reply ("0-0": none)."""
    return bytes(reply[0][0]) if reply else b"0-0"


def _reads(task_id: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The job's hash and its latest result: what a task is read from."""
    return (
        ("HGETALL", f"rq:job:{task_id}"),
        _latest(f"rq:results:{task_id}"),
    )
