"""Engine room: commands issued in the same turn of the event loop go to Redis as
one pipeline.

Under load, many requests are in flight at once and each would pay redis-py's
fixed cost of a call (~50 µs of CPU: take a connection, write, wait, parse, give
it back) and a round trip of its own. Queued here instead, the commands of one
turn of the loop share a single write and a single read: a batch of eight costs
about half as much per command (measured in docs/phase3.md, "the engine room"). With one request in
flight it is a plain call, one loop turn later. Node's ioredis calls this
"auto-pipelining"; redis-py does not do it for us.

Each command keeps its own outcome: an error reply fails that caller only; a lost
connection fails the whole batch (none of it can be known to have run).

Writes sent with ``execute_write`` are acknowledged by one Redis ``WAIT`` at the
end of their batch, on the same connection, which covers every write before it
(TASKMAN_REDIS_MIN_REPLICAS; what that promises: phase2_queue/replicas.py).
"""

import asyncio
from typing import Any

import redis.asyncio as aioredis

from phase2_queue.replicas import confirm

# A command, its caller's future, and whether WAIT must acknowledge it.
Queued = tuple[tuple[Any, ...], "asyncio.Future[Any]", bool]


class AutoPipeline:
    def __init__(
        self, redis: aioredis.Redis, wait: tuple[str, int, int] | None = None
    ) -> None:
        """``wait``: the WAIT command that acknowledges writes (replicas.py's
        wait_command()), or None for none."""
        self._redis = redis
        self._wait = wait
        self._waiting: list[Queued] = []
        self._sending: set[asyncio.Task[None]] = set()

    @property
    def redis(self) -> aioredis.Redis:
        """The client it sends with, for what cannot wait for a batch."""
        return self._redis

    async def execute_command(self, *args: Any) -> Any:
        """The reply to one command, sent with whatever else this loop turn sends."""
        return await self._queue(args)

    async def execute_write(self, *args: Any) -> Any:
        """Like execute_command, and answered only once WAIT has confirmed it (if
        a WAIT is asked for); NotReplicated if too few replicas did."""
        return await self._queue(args, self._wait is not None)

    async def execute_commands(self, *commands: tuple[Any, ...]) -> list[Any]:
        """The replies to several commands, in order; the first error is raised."""
        return await asyncio.gather(*(self._queue(args) for args in commands))

    def _queue(self, args: tuple[Any, ...], acked: bool = False) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((args, future, acked))
        if len(self._waiting) == 1:
            loop.call_soon(self._flush)  # after every handler ready this turn
        return future

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[Queued]) -> None:
        wait = self._wait if any(acked for *_, acked in batch) else None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for args, *_ in batch:
                    pipe.execute_command(*args)
                if wait is not None:  # last: it covers every write before it
                    pipe.execute_command(*wait)
                replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, future, _ in batch:
                future.cancel()
            raise
        except Exception as error:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        refused: Exception | None = None
        if wait is not None:
            refused = _unconfirmed(replies.pop(), wait[1])
        for (_, future, acked), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller went away (the client disconnected)
                continue
            if acked and refused is not None and not isinstance(reply, Exception):
                future.set_exception(refused)
            elif isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def aclose(self) -> None:
        """Let batches already sent finish, so no caller is left waiting."""
        if self._waiting:
            self._flush()
        await asyncio.gather(*self._sending, return_exceptions=True)


def _unconfirmed(acknowledged: Any, wanted: int) -> Exception | None:
    """WAIT's reply as the error to give its batch's writes, or None if enough
    replicas confirmed them."""
    if isinstance(acknowledged, Exception):
        acknowledged = 0  # WAIT itself failed (a replica now?): nothing confirmed
    try:
        confirm(int(acknowledged), wanted)
    except Exception as error:
        return error
    return None
