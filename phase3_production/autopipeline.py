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
"""

import asyncio
from typing import Any

import redis.asyncio as aioredis


class AutoPipeline:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    @property
    def redis(self) -> aioredis.Redis:
        """The client it sends with, for what cannot wait for a batch."""
        return self._redis

    async def execute_command(self, *args: Any) -> Any:
        """The reply to one command, sent with whatever else this loop turn sends."""
        return await self._queue(args)

    async def execute_commands(self, *commands: tuple[Any, ...]) -> list[Any]:
        """The replies to several commands, in order; the first error is raised."""
        return await asyncio.gather(*(self._queue(args) for args in commands))

    def _queue(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((args, future))
        if len(self._waiting) == 1:
            loop.call_soon(self._flush)  # after every handler ready this turn
        return future

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(
        self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]
    ) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for args, _ in batch:
                    pipe.execute_command(*args)
                replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller went away (the client disconnected)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def aclose(self) -> None:
        """Let batches already sent finish, so no caller is left waiting."""
        if self._waiting:
            self._flush()
        await asyncio.gather(*self._sending, return_exceptions=True)
