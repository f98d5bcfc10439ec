"""Engine room: the enqueue in one round trip, the job hash written directly.

Phase 2's ``Queue.enqueue`` builds a Job (``Job.create`` and ``to_dict``: ~50 µs of
CPU, as much as the rest of a POST), then sends it from a thread; with an
Idempotency-Key it is WATCH, GET and MULTI/EXEC, three round trips. Here one Lua
script takes the key, writes the hash RQ would write and pushes the id: all or
nothing, in one round trip, shared with other requests' (autopipeline.py).

What it buys (docs/phase3.md, "the engine room"): with the async client and the
auto-pipeline, POST /tasks costs about half the API CPU of phase 2's. What it
costs: it writes RQ's private job format by hand. tests/test_engine_room.py holds
the hash to what phase 2's plain ``enqueue`` writes, field by field, so an RQ
upgrade that changes the format fails a test, not a job.
"""

import zlib
from typing import Any

from pydantic_core import to_json
from redis.exceptions import NoScriptError
from rq.job import JobStatus

from common.models import Task
from common.settings import Settings
from phase2_queue.jobs import FUNCTIONS, JOB_TIMEOUT
from phase3_production.autopipeline import AutoPipeline

# SET NX the idempotency key, write the job hash, push its id: all or nothing, in
# one round trip. KEYS: the job's hash, the queue's list, the idempotency key (''
# for none). ARGV: the job id, the idempotency record and its TTL, then the hash's
# fields and values, flat. redis-py sends a call again when its connection fails,
# even if the first one reached Redis: a job that exists is such a repeat, and
# pushing its id again would run it twice. (Ids are random: a new one never exists.)
ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if KEYS[3] ~= '' then
  local earlier = redis.call('GET', KEYS[3])
  if earlier then return earlier end
  redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('SADD', 'rq:queues', KEYS[2])
return false
"""

SMALL_CALL = 512  # bytes of JSON
# Fields Job.to_dict() writes as "" until a worker or a callback sets them.
UNSET_FIELDS = (
    "success_callback_name",
    "failure_callback_name",
    "stopped_callback_name",
    "started_at",
    "ended_at",
    "last_heartbeat",
    "worker_name",
    "group_id",
)


class Enqueue:
    """ENQUEUE by its digest, for one queue."""

    def __init__(self, settings: Settings, queue_name: str, batch: AutoPipeline):
        self._settings = settings
        self._queue_key = f"rq:queue:{queue_name}"
        self._batch = batch
        self._sha = batch.redis.register_script(ENQUEUE).sha
        # What every job of ours has in common, as Job.to_dict() writes it.
        fixed = {
            **dict.fromkeys(UNSET_FIELDS, ""),
            "origin": queue_name,
            "status": JobStatus.QUEUED.value,
            "timeout": JOB_TIMEOUT,
            "result_ttl": settings.retention_seconds,
            "failure_ttl": settings.retention_seconds,
        }
        self._fixed_fields = [item for field in fixed.items() for item in field]

    async def __call__(self, task: Task, key: str, record: str) -> bytes | None:
        """Queue the task; if ``key`` (an idempotency key's Redis key, or '') is
        taken already, queue nothing and answer its record."""
        command = (
            *("EVALSHA", self._sha, 3),
            *(f"rq:job:{task.id}", self._queue_key, key),
            *(task.id, record, self._settings.idempotency_ttl),
            *self.job_hash(task),
        )
        try:
            earlier: bytes | None = await self._batch.execute_write(*command)
        except NoScriptError:  # a Redis that restarted has forgotten the script
            await self._batch.redis.script_load(ENQUEUE)
            earlier = await self._batch.execute_write(*command)
        return earlier

    def job_hash(self, task: Task) -> list[Any]:
        """The hash RQ's ``Queue.enqueue`` writes for this job (``Job.to_dict()``),
        as a flat list of fields and values."""
        # The call as RQ's JSONSerializer reads it: function, instance, args, kwargs.
        # (pydantic's to_json: the same JSON, less spaces, in a fifth of the time.)
        call = to_json([FUNCTIONS[task.type], None, [], task.payload])
        # RQ's utcformat(), without strftime's cost.
        moment = (
            task.created_at.replace(tzinfo=None).isoformat("T", "microseconds") + "Z"
        )
        fields = [
            *self._fixed_fields,
            *("data", _compress(call)),
            *("created_at", moment, "enqueued_at", moment),
            # A fixed, safe description: rq-dashboard renders it unescaped.
            *("description", f"taskman {task.type} task"),
            *("meta", f'{{"max_retries": {task.max_retries}}}'),
        ]
        if task.max_retries:
            delays = [
                self._settings.retry_delay(n) for n in range(1, task.max_retries + 1)
            ]
            fields += ("retries_left", task.max_retries)
            fields += ("retry_intervals", to_json(delays))
        return fields


def _compress(data: bytes) -> bytes:
    """In zlib's format, as RQ's zlib.decompress() expects. zlib.compress() first
    sets up a 32 KiB window and its tables: ~30 µs of CPU on this machine, for a
    call of 50 bytes that it cannot make any smaller. A small call is stored as
    it is (level 0, a 512-byte window: under 1 µs); a large one is compressed."""
    if len(data) > SMALL_CALL:
        return zlib.compress(data)
    compressor = zlib.compressobj(0, zlib.DEFLATED, 9, 1)
    return compressor.compress(data) + compressor.flush()
