"""Engine room: a job in three Redis round trips, take, start, outcome (RQ's
worker: 21; phase 3 before this module: 8), each one a single script or
MULTI/EXEC, so none is ever half written.

1. take (FastQueue.dequeue_any): one script moves the next job id from the
   first non-empty queue (high, normal, low) to RQ's intermediate list of that
   queue, and returns the job's hash with it. RQ's own: LMOVE (or BLPOP on
   several queues, which puts the job nowhere while it is taken) and HGETALL.
   When every queue is empty the worker blocks on the wake stream (below), not
   in RQ's BLPOP: a job is never off every list before its start is written.
2. start (worker.py): RQ's two start pipelines (the execution and the worker's
   busy state; the job's start) in one MULTI/EXEC.
3. outcome (run_outcome, below): the outcome claim (phase 2's CLAIM) and RQ's
   success writes in one script, which Redis runs as one step: no WATCH, because
   nothing can land between the check for dependents and the writes.

What it costs in coupling: the success writes are RQ's own, made by RQ's own
methods into a pipeline that is never sent; the script replays them. So a
change in *what* RQ writes is followed for free, but the script trusts that
RQ's success is only writes (true of rq 3.0; a read inside would get a
pipeline, not a value) and it touches keys it is not passed (fine on one
Redis or Sentinel, which is what taskman supports, not on Redis Cluster).
tests/test_engine_room.py holds the job's hash, its result and the registries
after a run to what phase 2's plain RQ worker leaves.

The wait of an idle worker. RQ's worker, on three queues, blocks in BLPOP, which
takes the id off its queue and puts it nowhere until the worker writes its start:
a worker killed in between, or a Sentinel failover that replicated the pop but
not the start, leaves a job ``queued`` on no list, which nothing ever runs (seen
in tests/test_failover.py). Redis cannot block on a list without popping it, so
phase 3's enqueue (enqueue.py) also adds an entry to a stream, the wake stream,
and an idle worker blocks in XREAD on its queues', then takes with the script above,
which moves the id atomically. A job pushed by anyone else (RQ's scheduler moving
a due or retried job, a stock ``rq enqueue``) wakes no one: an idle worker takes
it within WAKE_POLL_SECONDS. Every idle worker wakes for each push and all but
one find nothing: one script call each, only while they are idle.
"""

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from rq import Queue
from rq.job import Job, parse_job_id
from rq.utils import as_text

from phase2_queue.taking import TakingQueue, wait_left
from phase2_queue.worker import CLAIM

# The longest an idle worker blocks on the wake stream before it looks at the
# queues again: how late it takes a job that was pushed without a wake.
WAKE_POLL_SECONDS = 1.0


def wake_key(queue_name: str) -> str:
    """A queue's wake stream: one entry, replaced by each enqueue on the queue."""
    return f"taskman:wake:{queue_name}"


# Runs the writes in ARGV from ARGV[first]: each as its length, then its words.
REPLAY = """
local function replay(first)
  local i = first
  while i <= #ARGV do
    local n = tonumber(ARGV[i])
    redis.call(unpack(ARGV, i + 1, i + n))
    i = i + n + 1
  end
end
"""

# The start: RQ's writes, replayed (one reply, where MULTI/EXEC sends one a command).
START = REPLAY + "replay(1)"

# The previous job's outcome, then the take of the next job.
# Outcome: phase 2's claim, then, if the run is ours, RQ's success writes. KEYS
# 1-3 and ARGV 1-3 as CLAIM's (ARGV[1] empty: no outcome to report); KEYS[4]: the
# job's dependents (RQ enqueues them on success: then the worker takes RQ's own
# path, and this writes nothing); ARGV[6:]: the writes.
# Take: ARGV[5] queues, the last 3 * ARGV[5] KEYS (the queues in order, their
# intermediate lists, their wake streams); ARGV[4]: RQ's job key prefix. The id
# moves to the intermediate list and the job's hash comes back with it, and the
# queue's number; an id whose job is gone is dropped, as RQ's dequeue skips it.
# Every queue empty: number 0, and the id of each wake stream's last entry, for
# the worker to block after them.
OUTCOME_AND_TAKE = f"""
local function claim()
{CLAIM}
end
{REPLAY}
local function report()
  if ARGV[1] == '' then return '' end
  if redis.call('EXISTS', KEYS[4]) == 1 then return 'dependents' end
  local verdict = claim()
  if verdict == 'ours' then replay(6) end
  return verdict
end
local verdict = report()
local n = tonumber(ARGV[5])
local first = #KEYS - 3 * n
for i = 1, n do
  local queue, intermediate = KEYS[first + i], KEYS[first + n + i]
  while true do
    local id = redis.call('LMOVE', queue, intermediate, 'LEFT', 'RIGHT')
    if not id then break end
    local hash = redis.call('HGETALL', ARGV[4] .. id)
    if #hash > 0 then return {{verdict, i, id, hash}} end
    redis.call('LREM', intermediate, 1, id)
  end
end
local seen = {{}}
for i = 1, n do
  local last = redis.call('XREVRANGE', KEYS[first + 2 * n + i], '+', '-', 'COUNT', 1)
  seen[i] = last[1] and last[1][1] or '0-0'
end
return {{verdict, 0, seen}}
"""


def flatten(writes: Sequence[Sequence[Any]]) -> list[Any]:
    """Writes as REPLAY reads them."""
    flat: list[Any] = []
    for words in writes:
        flat.append(len(words))
        flat.extend(words)
    return flat


def captured(pipeline: Any) -> list[Any]:
    """The commands queued in a redis-py pipeline (never to be sent), flattened."""
    return flatten([words for words, _ in pipeline.command_stack])


class Outcome:
    """A success whose writes wait for the next take (or a flush): keys and
    args of its claim, its writes, and what to do if the run is no longer ours."""

    def __init__(
        self,
        keys: list[str],
        args: list[Any],
        refused: Callable[[], None],
    ) -> None:
        self.keys, self.args, self.refused = keys, args, refused

    def settle(self, verdict: str) -> None:
        if verdict != "ours":
            self.refused()


class Outbox:
    """The worker's one pending Outcome, shared with its queues (the take is a
    classmethod of the queue's, which RQ calls with them)."""

    def __init__(self) -> None:
        self.pending: Outcome | None = None

    def run(
        self,
        connection: redis.Redis,
        queues: Sequence[Queue] = (),
    ) -> list[Any]:
        """OUTCOME_AND_TAKE with what is pending and ``queues``; its reply, less
        the verdict, which it settles: the job taken (its queue's number from 1,
        its id, its hash), or 0 and the id of each wake stream's last entry."""
        pending, self.pending = self.pending, None
        keys = pending.keys if pending else []
        keys = [
            *keys,
            *(q.key for q in queues),
            *(q.intermediate_queue_key for q in queues),
            *(wake_key(q.name) for q in queues),
        ]
        head = pending.args[:3] if pending else ["", "", ""]
        tail = pending.args[3:] if pending else []
        args = [*head, Job.redis_job_namespace_prefix, len(queues), *tail]
        try:
            reply: Any = connection.register_script(OUTCOME_AND_TAKE)(
                keys=keys, args=args
            )
        except redis.RedisError:
            # Sent again with the next try (RQ's dequeue retries). If it had
            # landed, the claim now finds the job finished and refuses it.
            self.pending = pending
            raise
        if pending is not None:
            pending.settle(as_text(reply[0]))
        return list(reply[1:])


class FastQueue(TakingQueue):
    """RQ's queue, whose dequeue takes a job and its hash in one round trip,
    the round trip that reports the job before (its ``outbox``)."""

    outbox: Outbox | None = None

    @classmethod
    def of(cls, queue: Queue, outbox: Outbox) -> "FastQueue":
        """The same queue, of this class, sharing ``outbox``."""
        fast = cls.from_queue(queue)
        fast.outbox = outbox
        return fast

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
        outbox = getattr(listened[0], "outbox", None) or Outbox()
        reported = outbox.pending is not None
        taken = outbox.run(connection, listened)
        if taken[0] == 0 and reported:  # the report may have queued dependents
            taken = outbox.run(connection, listened)
        deadline = time.monotonic() + (timeout or 0)
        while taken[0] == 0:  # every queue empty: wait for a wake (or a poll)
            left = wait_left(timeout, deadline, listened)
            if left is None:
                return None
            seen = zip((wake_key(q.name) for q in listened), taken[1], strict=True)
            block = max(1, int(min(left, WAKE_POLL_SECONDS) * 1000))
            connection.xread(dict(seen), count=1, block=block)
            taken = outbox.run(connection, listened)
        index, job_id, flat = taken
        queue = listened[index - 1]
        job_id = as_text(job_id)
        job = (job_class or queue.job_class)(
            parse_job_id(job_id),
            connection=connection,
            serializer=serializer,
        )
        try:
            job.restore(dict(zip(flat[::2], flat[1::2], strict=True)))
        except Exception as error:
            # As RQ's dequeue: the job and its queue named on the error, for the
            # worker to fail it and go on (recovery.py).
            error.job_id = job_id  # type: ignore[attr-defined]
            error.queue = queue  # type: ignore[attr-defined]
            raise
        return job, queue
