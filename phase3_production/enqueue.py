"""Engine room: the enqueue in one round trip, the job hashes written directly.

Phase 2's ``Queue.enqueue`` builds a Job (``Job.create`` and ``to_dict``: ~50 µs of
CPU, as much as the rest of a POST), then sends it from a thread; with an
Idempotency-Key it is WATCH, GET and MULTI/EXEC, three round trips. Here one Lua
script takes the key, writes the hashes RQ would write, pushes each id on its
priority's queue (or, for a due time, adds it to that queue's scheduled registry,
as ``enqueue_at`` does) and adds it to the index GET /tasks reads: all or nothing,
in one round trip, shared with other requests' (autopipeline.py). A batch is the
same one call with every job in it: ``Queue.enqueue_many`` builds a Job per task
and sends a pipeline of ~4 commands each from a thread.

What it buys (docs/phase3.md, "the engine room"): with the async client and the
auto-pipeline, POST /tasks costs about half the API CPU of phase 2's, and a batch
of 100 one script call. What it costs: it writes RQ's private job format by hand.
tests/test_engine_room.py and tests/test_phase3_features.py hold the hash to what
phase 2's plain ``enqueue``/``enqueue_at`` write, field by field, queued,
scheduled and prioritised, so an RQ upgrade that changes the format fails a test,
not a job.
"""

import json
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from pydantic_core import to_json
from redis.exceptions import NoScriptError
from rq.job import JobStatus

from common.listing import position
from common.models import Priority, Task
from common.settings import Settings
from phase2_queue.jobs import (
    FUNCTIONS,
    JOB_TIMEOUT,
    due_second,
    index_key,
    queue_name,
)
from phase3_production.autopipeline import AutoPipeline
from phase3_production.jobloop import wake_key

# SET NX the idempotency key, then for each job: write its hash, push its id (or
# schedule it) and wake the idle workers of its queue (once a call: jobloop.py's
# wake stream), index it. KEYS: the idempotency key ('' for none), the index,
# then per job its hash, where it goes (its queue's list, or that queue's
# scheduled registry), its queue's list and its queue's wake stream. ARGV: the
# idempotency record and its TTL, the number of fields and values every job's hash
# has in common and those, flat (sent once, not once a job: a batch of 100 is half
# the bytes to pack and send), then per job its id, its index member, its due
# timestamp ('' for now), the number of its own fields and values, and those. redis-py sends a call again when
# its connection fails, even if the first one reached Redis: a first job that
# exists is such a repeat (the script is atomic: then they all do), and pushing
# again would run them twice. (Ids are random: a new one never exists.)
ENQUEUE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
if KEYS[1] ~= '' then
  local earlier = redis.call('GET', KEYS[1])
  if earlier then return earlier end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
local common = tonumber(ARGV[3])
local a = 4 + common
local woken = {}
for k = 3, #KEYS, 4 do
  local count = tonumber(ARGV[a + 3])
  redis.call('HSET', KEYS[k], unpack(ARGV, 4, 3 + common))
  redis.call('HSET', KEYS[k], unpack(ARGV, a + 4, a + 3 + count))
  redis.call('SADD', 'rq:queues', KEYS[k + 2])
  if ARGV[a + 2] == '' then
    redis.call('RPUSH', KEYS[k + 1], ARGV[a])
    if not woken[KEYS[k + 3]] then
      redis.call('XADD', KEYS[k + 3], 'MAXLEN', '1', '*', 'n', '1')
      woken[KEYS[k + 3]] = true
    end
  else
    redis.call('ZADD', KEYS[k + 1], ARGV[a + 2], ARGV[a])
  end
  redis.call('ZADD', KEYS[2], 0, ARGV[a + 1])
  a = a + 4 + count
end
return false
"""

SMALL_CALL = 512  # bytes of JSON
# A zlib stream's header (deflate, 32 KiB window, no dictionary: 0x7801 is a
# multiple of 31, as RFC 1950 wants) and a final stored block's first byte; the
# block's length and its ones' complement; the checksum, big-endian.
ZLIB_HEADER = b"\x78\x01\x01"
STORED_BLOCK = struct.Struct("<HH")
ADLER32 = struct.Struct(">I")
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
    """ENQUEUE by its digest, for our queues."""

    def __init__(self, settings: Settings, batch: AutoPipeline):
        self._settings = settings
        self._index = index_key(settings)
        self._batch = batch
        self._sha = batch.redis.register_script(ENQUEUE).sha
        # What every job of ours has in common, as Job.to_dict() writes it.
        fixed = {
            **dict.fromkeys(UNSET_FIELDS, ""),
            "timeout": JOB_TIMEOUT,
            "result_ttl": settings.retention_seconds,
            "failure_ttl": settings.retention_seconds,
        }
        self._fixed_fields = [item for field in fixed.items() for item in field]
        self._queue_names = {p: queue_name(settings, p) for p in Priority}

    async def __call__(
        self, tasks: Sequence[Task], key: str, record: str
    ) -> bytes | None:
        """Queue the tasks, all or none; if ``key`` (an idempotency key's Redis
        key, or '') is taken already, queue nothing and answer its record."""
        keys: list[str] = [key, self._index]
        args: list[Any] = [record, self._settings.idempotency_ttl]
        args += (len(self._fixed_fields), *self._fixed_fields)
        for task in tasks:
            queue = self._queue_names[task.priority]
            fields = self.job_hash(task)
            due = "" if task.run_at is None else _timestamp(task)
            where = f"rq:queue:{queue}" if due == "" else f"rq:scheduled:{queue}"
            keys += (f"rq:job:{task.id}", where, f"rq:queue:{queue}", wake_key(queue))
            args += (task.id, position(task.id, task.created_at), due, len(fields))
            args += fields
        command = ("EVALSHA", self._sha, len(keys), *keys, *args)
        try:
            earlier: bytes | None = await self._batch.execute_write(*command)
        except NoScriptError:  # a Redis that restarted has forgotten the script
            await self._batch.redis.script_load(ENQUEUE)
            earlier = await self._batch.execute_write(*command)
        return earlier

    def job_hash(self, task: Task) -> list[Any]:
        """The hash RQ's ``Queue.enqueue`` (or, for a due time, ``enqueue_at``)
        writes for this job (``Job.to_dict()``), as a flat list of fields and
        values, less the fields every job of ours has in common (the script
        writes those, sent once a call)."""
        # The call as RQ's JSONSerializer reads it: function, instance, args, kwargs.
        # (pydantic's to_json: the same JSON, less spaces, in a fifth of the time.)
        call = to_json([FUNCTIONS[task.type], None, [], task.payload])
        # RQ's utcformat(), without strftime's cost.
        moment = (
            task.created_at.replace(tzinfo=None).isoformat("T", "microseconds") + "Z"
        )
        fields: list[Any] = [
            *("origin", self._queue_names[task.priority]),
            *("data", _compress(call)),
            *("created_at", moment),
            # A fixed, safe description: rq-dashboard renders it unescaped.
            *("description", f"taskman {task.type} task"),
            *("meta", _meta(task)),
        ]
        if task.run_at is None:
            fields += ("status", JobStatus.QUEUED.value, "enqueued_at", moment)
        else:  # enqueue_at: not enqueued yet (RQ's scheduler does that when due)
            fields += ("status", JobStatus.SCHEDULED.value)
        if task.max_retries:
            delays = [
                self._settings.retry_delay(n) for n in range(1, task.max_retries + 1)
            ]
            fields += ("retries_left", task.max_retries)
            fields += ("retry_intervals", to_json(delays))
        return fields


def _meta(task: Task) -> str:
    """The job's meta as phase 2 gives it to RQ, in RQ's JSONSerializer's spacing."""
    if task.run_at is None:  # the common case, without json.dumps' ~5 µs
        return f'{{"max_retries": {task.max_retries}}}'
    # GET reads run_at back from here.
    return json.dumps(
        {"max_retries": task.max_retries, "run_at": task.run_at.isoformat()}
    )


def _timestamp(task: Task) -> int:
    """The due time as phase 2 schedules it (``due_second``: rounded up, so the
    task never starts early) and RQ's ScheduledJobRegistry scores it: whole
    seconds."""
    assert task.run_at is not None
    return int(due_second(task.run_at).timestamp())


def _compress(data: bytes) -> bytes:
    """In zlib's format, as RQ's zlib.decompress() expects. zlib.compress() first
    sets up a 32 KiB window and its tables: ~30 µs of CPU on this machine, for a
    call of 50 bytes that it cannot make any smaller. A small call is stored as
    it is, the zlib stream written by hand (RFC 1950/1951: a header, one final
    stored block, the Adler-32): ~0.6 µs against ~2 µs for a level-0
    compressobj (timeit, same call, same run); a large one is compressed.
    tests/test_engine_room.py holds the job's data to what RQ itself reads."""
    if len(data) > SMALL_CALL:
        return zlib.compress(data)
    size = len(data)
    block = STORED_BLOCK.pack(size, size ^ 0xFFFF)
    return b"".join((ZLIB_HEADER, block, data, ADLER32.pack(zlib.adler32(data))))
