"""Engine room: a local allowance, so that most rate-limited requests ask Redis
nothing.

Counting every request in Redis costs a round trip per request (~40 µs of the API
process's CPU a request, see docs/phase3.md). Instead, when a limit is large, each
API process reserves a *block* of the client's budget in Redis, in one atomic script,
and spends it locally; the next reservation gives back what is left of the last one.

Exactness: a reservation is counted in Redis before any of it is spent, so the API
processes together never admit more than the limit. For the moving window that
needs this script of our own (limits' acquire script stamps its entries with the
moment it checks): a block may be spent for up to ``lifetime`` (a tenth of the
window, at most 1 s) after it was taken, so its entries are stamped at the *end* of
that time.
Each entry then stays in the window at least a window after every request it
admitted, and every check a window later still sees it.

The price, stated in docs/contract.md and held by tests/test_ratelimit.py:
- under-admission: at most ``block - 1`` reserved and not yet spent per API process
  (per policy and client), while it lasts; a client may be refused that far below
  its limit. An entry also counts up to ``lifetime`` longer than its request.
- ``r`` in the RateLimit header is Redis' count at the reservation minus what this
  process spent since: an estimate, off by what other processes did meanwhile.
Blocks are ``limit // 100``, at most 100: a limit under 200 per window gets blocks
of 1, which is the exact per-request count with no allowance at all.
Coupling: the entries live in limits' own list (its key, its layout, newest first),
so limits' window script reads them and the two strategies agree.
"""

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from phase3_production.autopipeline import AutoPipeline

# Blocks are at most this big, and a hundredth of the limit: the under-admission
# bound is then at most 1% of the limit per API process.
MAX_BLOCK = 100
BLOCK_FRACTION = 100
# A block is spent within a tenth of its window (at most a second), or given
# back: long enough to outlast a reservation's round trip many times over.
LIFETIME_FRACTION = 10
MAX_LIFETIME = 1.0

# KEYS[1]: limits' moving-window list (newest first). ARGV: now, limit, window,
# block, stamp, returned, returned_stamp. Gives back ``returned`` entries of the
# last block, then takes ``block`` entries if the window has room for them, else
# 1 if it has room for 1, else none; stamped ``stamp`` (or the newest entry's, if
# later: the list must stay sorted for limits' scripts). Answers what it took.
RESERVE = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local block = tonumber(ARGV[4])
local stamp = ARGV[5]
if tonumber(ARGV[6]) > 0 then
    redis.call('lrem', KEYS[1], tonumber(ARGV[6]), ARGV[7])
end
local head = redis.call('lindex', KEYS[1], 0)
if head and tonumber(head) > tonumber(stamp) then
    stamp = head
end
for _, amount in ipairs({block, 1}) do
    local entry = redis.call('lindex', KEYS[1], limit - amount)
    if not entry or tonumber(entry) < now - window then
        local entries = {}
        for i = 1, amount do
            entries[i] = stamp
        end
        redis.call('lpush', KEYS[1], unpack(entries))
        redis.call('ltrim', KEYS[1], 0, limit - 1)
        redis.call('expire', KEYS[1], math.ceil(tonumber(stamp) - now + window) + 1)
        return {amount, stamp}
    end
end
return {0, stamp}
"""


def block_size(limit: int) -> int:
    """How many requests of a ``limit`` one reservation takes (1: none local)."""
    return max(1, min(MAX_BLOCK, limit // BLOCK_FRACTION))


@dataclass
class Block:
    """What is left of one reservation in this process."""

    left: int
    stamp: str  # the entries' value in Redis, to give the rest back by
    until: float  # monotonic: spend no later than this
    remaining: int  # Redis' count of what was left after the reservation
    reset_at: float  # epoch seconds: when the oldest entry leaves the window

    def usable(self) -> bool:
        return self.left > 0 and time.monotonic() < self.until


@dataclass(frozen=True)
class Spent:
    """One request counted: admitted or not, with what the headers report."""

    allowed: bool
    remaining: int
    reset_at: float


class Allowances:
    """The blocks of one API process, one per (list key) = policy and client."""

    def __init__(self, redis: aioredis.Redis, batch: AutoPipeline) -> None:
        self._redis = redis
        self._batch = batch
        self._blocks: dict[str, Block] = {}
        self._reserving: dict[str, asyncio.Future[Spent | None]] = {}
        self._sha = ""

    async def spend(
        self, key: str, limit: int, window: int, block: int, window_script: Any
    ) -> Spent:
        """Count one request against the moving-window list ``key``: locally if
        this process holds a block of it, else by reserving one (``window_script``:
        limits' script that reads the window, for the headers)."""
        while True:
            held = self._blocks.get(key)
            if held is not None and held.usable():
                held.left -= 1
                held.remaining = max(0, held.remaining - 1)
                return Spent(True, held.remaining, held.reset_at)
            pending = self._reserving.get(key)
            if pending is None:
                return await self._reserve(key, limit, window, block, window_script)
            # Another request of this client is reserving: wait for its block
            # rather than take a second one (the bound is one block a process).
            # Its refusal is ours too: the window was full while we waited.
            refused = await asyncio.shield(pending)
            if refused is not None:
                return refused

    async def _reserve(
        self, key: str, limit: int, window: int, block: int, window_script: Any
    ) -> Spent:
        done: asyncio.Future[Spent | None] = asyncio.get_running_loop().create_future()
        self._reserving[key] = done
        spent = None
        try:
            spent = await self._reserve_once(key, limit, window, block, window_script)
            return spent
        finally:
            del self._reserving[key]
            done.set_result(spent if spent is not None and not spent.allowed else None)

    async def _reserve_once(
        self, key: str, limit: int, window: int, block: int, window_script: Any
    ) -> Spent:
        old = self._blocks.pop(key, None)
        returned = old.left if old is not None else 0
        # A block of 1 is spent at once: stamped now, as limits' own script does.
        lifetime = min(window / LIFETIME_FRACTION, MAX_LIFETIME) if block > 1 else 0.0
        # Both clocks read before the round trip: the block is spent no later
        # than the moment its entries are stamped with.
        now, until = time.time(), time.monotonic() + lifetime
        stamp = f"{now + lifetime:.6f}"
        args = (now, limit, window, block, stamp, returned, old.stamp if old else "")
        try:
            (taken, stamp_used), entries = await self._run(
                key, args, window_script, now
            )
        except BaseException:
            if old is not None:
                self._blocks[key] = old  # nothing was given back
            raise
        start, count = (float(entries[0]), int(entries[1])) if entries else (now, 0)
        remaining, reset_at = max(0, limit - count), start + window
        taken = int(taken)
        if not taken:
            return Spent(False, 0, reset_at)
        if taken > 1:
            self._blocks[key] = Block(
                left=taken - 1,
                stamp=stamp_used.decode(),
                until=until,
                remaining=remaining,
                reset_at=reset_at,
            )
        return Spent(True, remaining, reset_at)

    async def _run(
        self, key: str, args: tuple[Any, ...], window_script: Any, now: float
    ) -> tuple[Any, Any]:
        """The reservation and limits' read of the window, in one round trip."""
        if not self._sha:
            self._sha = await self._redis.script_load(RESERVE)
        reserve = ("EVALSHA", self._sha, 1, key, *args)
        read = ("EVALSHA", window_script.sha, 1, key, now - args[2], args[1])
        replies: tuple[Any, Any] = await asyncio.gather(
            self._batch.execute_command(*reserve),
            self._batch.execute_command(*read),
            return_exceptions=True,
        )
        taken, entries = replies
        if isinstance(taken, NoScriptError):
            # A (re)started Redis forgot the scripts; the missing one ran nothing.
            self._sha = await self._redis.script_load(RESERVE)
            await self._redis.script_load(window_script.script)
            taken, entries = await self._batch.execute_commands(reserve, read)
        elif isinstance(entries, NoScriptError):  # the reservation did run
            await self._redis.script_load(window_script.script)
            entries = await self._batch.execute_command(*read)
        for reply in (taken, entries):
            if isinstance(reply, BaseException):
                raise reply
        return taken, entries
