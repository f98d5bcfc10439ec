"""Phase 3: phase 2's RQ backend, its hot paths rebuilt in the engine room.

The jobs are the same plain RQ jobs; only the way to Redis changes. POST is one
script (enqueue.py), GET one round trip for the job and its latest result, both
from the event loop (redis_client.py) and batched with other requests'
(autopipeline.py): no thread hand-off, no RQ objects built to be thrown away.
DELETE, rare and subtle, stays phase 2's.
"""

from typing import Any

from rq import Queue
from rq.results import Result
from rq.serializers import JSONSerializer

from common.backend import IdempotencyConflict
from common.models import Task, TaskCreate, new_task
from common.settings import Settings
from phase2_queue.backend import (
    UNREADABLE,
    RQBackend,
    end_registry,
    live_workers,
    not_a_task,
    to_task,
    unavailable_when_redis_is_down,
)
from phase2_queue.jobs import TaskJob
from phase2_queue.replicas import wait_command
from phase3_production.autopipeline import AutoPipeline
from phase3_production.enqueue import Enqueue
from phase3_production.redis_client import connect_async


class FastRQBackend(RQBackend):
    """Phase 2's backend with the engine room's submit, get and health."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.redis = connect_async(settings)
        # The cache reads through it too; WAIT: see phase2_queue/replicas.py.
        self.batch = AutoPipeline(self.redis, wait=wait_command(settings))
        self._enqueue_script = Enqueue(settings, self._queue.name, self.batch)

    @property
    def queue(self) -> Queue:
        """RQ's queue, for the metrics (its depth) and the worker counts."""
        return self._queue

    async def submit(
        self, request: TaskCreate, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        task = new_task(request, self._settings.max_retries)
        fingerprint = request.fingerprint() if idempotency_key else ""
        key = f"taskman:idempotency:{idempotency_key}" if idempotency_key else ""
        with unavailable_when_redis_is_down():
            earlier = await self._enqueue_script(task, key, f"{fingerprint} {task.id}")
        if earlier:
            earlier_fingerprint, earlier_id = earlier.decode().split(" ")
            if earlier_fingerprint != fingerprint:
                raise IdempotencyConflict("Idempotency-Key was used with another body")
            found = await self.get(earlier_id)
            if found is not None:
                return found, False
            # The first task has expired: forget the key and start afresh.
            with unavailable_when_redis_is_down():
                await self.redis.delete(key)
            return await self.submit(request, idempotency_key)
        return task, True

    async def get(self, task_id: str) -> Task | None:
        with unavailable_when_redis_is_down():
            # One round trip, shared with other requests' (see autopipeline.py).
            raw, results = await self.batch.execute_commands(
                ("HGETALL", f"rq:job:{task_id}"),
                ("XREVRANGE", f"rq:results:{task_id}", "+", "-", "COUNT", 1),
            )
        if not raw or b"data" not in raw:
            return None
        # What Job.fetch() and job.latest_result() do with these replies.
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

    async def health(self) -> dict[str, Any]:
        with unavailable_when_redis_is_down():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.ping()
                pipe.llen(self._queue.key)
                pipe.smembers(f"rq:workers:{self._settings.queue_name}")
                _, queued, workers = await pipe.execute()
            async with self.redis.pipeline(transaction=False) as pipe:
                for worker in workers:  # the members are the workers' keys
                    pipe.hget(worker, "last_heartbeat")
                beats = await pipe.execute()
        return {"redis": "ok", "queued": queued, "workers": live_workers(beats)}

    async def aclose(self) -> None:
        await self.batch.aclose()
        await self.redis.aclose()
        await super().aclose()
