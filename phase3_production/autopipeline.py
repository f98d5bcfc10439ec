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
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from phase2_queue.replicas import confirm

# One caller's commands; its future, answered with their replies in order (or,
# for a single command, its reply); whether WAIT must acknowledge them.
Queued = tuple[tuple[tuple[Any, ...], ...], "asyncio.Future[Any]", bool]


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
        # Connections taken from the client's pool, free for the next batch.
        self._idle: list[AbstractConnection] = []

    @property
    def redis(self) -> aioredis.Redis:
        """The client it sends with, for what cannot wait for a batch."""
        return self._redis

    async def execute_command(self, *args: Any) -> Any:
        """The reply to one command, sent with whatever else this loop turn sends."""
        return (await self._queue((args,)))[0]

    async def execute_write(self, *args: Any) -> Any:
        """Like execute_command, and answered only once WAIT has confirmed it (if
        a WAIT is asked for); NotReplicated if too few replicas did."""
        return (await self._queue((args,), self._wait is not None))[0]

    async def execute_commands(self, *commands: tuple[Any, ...]) -> list[Any]:
        """The replies to several commands, in order; the first error is raised.

        One future for them all, not a gather of one each: a gather costs its
        caller an extra turn of the loop and ~5 µs of CPU (the rate limit's
        check and every GET send two commands)."""
        return await self._queue(commands)

    def _queue(
        self, commands: tuple[tuple[Any, ...], ...], acked: bool = False
    ) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._waiting.append((commands, future, acked))
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
        commands = [args for group, *_ in batch for args in group]
        if wait is not None:  # last: it covers every write before it
            commands.append(wait)
        try:
            replies = await self._round_trip(commands)
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
        start = 0
        for group, future, acked in batch:
            answers = replies[start : start + len(group)]
            start += len(group)
            if future.done():  # its caller went away (the client disconnected)
                continue
            failed = next((a for a in answers if isinstance(a, Exception)), None)
            if failed is not None:
                future.set_exception(failed)
            elif acked and refused is not None:
                future.set_exception(refused)
            else:
                future.set_result(answers)

    async def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to ``commands``, sent as one write on a connection of our
        own; an error reply in its place, as a pipeline gives it.

        Not through redis-py's Pipeline: per batch, it takes a connection from
        the pool under a lock, polls the socket for stray data, times and
        records the call for OpenTelemetry, and gives the connection back with
        an event. Measured with two commands a batch (HGETALL, XREVRANGE: a GET's)
        through execute_commands on a real Redis, CPU (process_time) per call,
        redis-py's Pipeline and a gather (before) against this, A B A B in one
        run on a loaded 2-core machine (so the ratio is the figure): one at a
        time 319-393 µs against 202-267 (~0.7), eight in flight 113-133 against
        63-64 (~0.5). A POST sends one or two batches. Here a connection once
        taken is kept for the next batch; one whose exchange broke off is
        disconnected first, so no reply of an old batch is read for a new one.
        Its one retry is redis-py's (the client's ``Retry(NoBackoff(), 1)``): a
        stale connection (Redis restarted, a failover) is tried once more.
        """
        connection = (
            self._idle.pop()
            if self._idle
            else await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        )
        try:
            try:
                replies = await self._exchange(connection, commands)
            except (RedisConnectionError, RedisTimeoutError):
                await connection.disconnect()
                replies = await self._exchange(connection, commands)
        except BaseException:
            await connection.disconnect(nowait=True)
            self._idle.append(connection)  # it reconnects when next used
            raise
        self._idle.append(connection)
        return replies

    async def _exchange(
        self, connection: AbstractConnection, commands: list[tuple[Any, ...]]
    ) -> list[Any]:
        try:
            await connection.connect()  # type: ignore[no-untyped-call]  # at once when connected
            await connection.send_packed_command(connection.pack_commands(commands))
            callbacks = self._redis.response_callbacks
            replies: list[Any] = []
            for args in commands:
                try:
                    reply = await connection.read_response()
                except ResponseError as error:
                    replies.append(error)
                    continue
                callback = callbacks.get(args[0])  # e.g. HGETALL's list to a dict
                replies.append(reply if callback is None else callback(reply))
            return replies
        except RuntimeError as error:
            # asyncio's "unable to perform operation on <TCPTransport closed=True>;
            # the handler is closed": a connection closed under redis-py as it
            # (re)connected, seen in a Sentinel failover (tests/test_failover.py).
            # A lost connection like any other, so a 503, not a 500.
            raise RedisConnectionError(f"connection lost: {error}") from error

    async def aclose(self) -> None:
        """Let batches already sent finish, so no caller is left waiting; then
        give our connections back to the pool."""
        if self._waiting:
            self._flush()
        await asyncio.gather(*self._sending, return_exceptions=True)
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._redis.connection_pool.release(connection)


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
