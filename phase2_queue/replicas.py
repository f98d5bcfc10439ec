"""Acknowledged means replicated: ``TASKMAN_REDIS_MIN_REPLICAS``.

Redis replicates asynchronously: it answers a write as soon as the primary has it,
and a primary that dies a moment later takes the write with it, even though the
client was told 202. With ``TASKMAN_REDIS_MIN_REPLICAS=n`` (n >= 1), the write of
a new task is followed, on the same connection, by Redis's ``WAIT n timeout``,
and POST answers 202 only if ``n`` replicas say they hold it. Else 503 with
Retry-After: the client cannot tell whether the task will survive, so it is not
told "accepted".

What it guarantees: a task answered 202 is on the primary and on ``n`` replicas,
so losing the primary (a Sentinel failover to one of them) loses no such task.
It is WAIT's promise, no more: the replicas have it in memory, not on their disk
(a crash of every copy at once can still lose it), and a failover may promote a
replica that had not acknowledged it (Sentinel picks the replica with the most
data, which is one that acknowledged, unless it is itself unreachable).

What happens on a 503 (WAIT timed out): the write itself is done, all or nothing
(a MULTI/EXEC or one script), so the task is wholly queued on the primary, never
half; it may well run, and may survive. It is not undone: a DELETE there could
race a worker that already took it. A client that retries with the same
Idempotency-Key gets that same task back, not a second one.

What it costs: one more round trip per write (or per auto-pipelined batch, which
one WAIT covers), waiting for the slowest of the ``n`` fastest replicas to
acknowledge, on loopback a fraction of a millisecond (docs/scaling.md has the
measurement); reads batched with those writes wait for it too. While fewer than
``n`` replicas are connected, every POST waits the timeout and answers 503.

WAIT counts the writes of the connection it is sent on, so it must go on the
connection that wrote: phase 2 pins one of its pool's connections to the thread
for the whole submit (RQ's own pipelines and ``transaction()`` take theirs from
the pool); phase 3 appends it to the auto-pipelined batch (autopipeline.py).
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
from redis.sentinel import SentinelConnectionPool

from common.backend import BackendUnavailable
from common.settings import Settings

T = TypeVar("T")


class NotReplicated(BackendUnavailable):
    """The task is written on the primary, but too few replicas confirmed it in
    time; the client should retry (with its Idempotency-Key, to get the same task)."""


def wait_command(settings: Settings) -> tuple[str, int, int] | None:
    """The WAIT that acknowledges a write, or None when none is asked for."""
    if not settings.redis_min_replicas:
        return None
    milliseconds = max(1, round(settings.redis_wait_timeout * 1000))
    return ("WAIT", settings.redis_min_replicas, milliseconds)


def confirm(acknowledged: int, wanted: int) -> None:
    """Raise NotReplicated unless ``acknowledged`` (WAIT's reply) reaches ``wanted``."""
    if acknowledged < wanted:
        raise NotReplicated(
            f"the task reached the queue's primary, but {acknowledged} of the "
            f"{wanted} replica(s) required confirmed it in time; retry with the same "
            "Idempotency-Key to get this task, not a second one"
        )


class _Pinnable:
    """A redis-py connection pool that can lend one connection to a thread for a
    while: every command and pipeline that thread runs meanwhile goes on it."""

    _local: threading.local

    def _pinned_connection(self) -> Any:
        local = self.__dict__.get("_local")
        return getattr(local, "connection", None) if local is not None else None

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        connection = self._pinned_connection()
        if connection is not None:
            return connection
        return super().get_connection(*args, **kwargs)  # type: ignore[misc]

    def release(self, connection: Any) -> None:
        if connection is not self._pinned_connection():
            super().release(connection)  # type: ignore[misc]

    @contextmanager
    def pinned(self) -> Iterator[Any]:
        local = self.__dict__.setdefault("_local", threading.local())
        connection = super().get_connection()  # type: ignore[misc]
        local.connection = connection
        try:
            yield connection
        except BaseException:
            # A reply may be left unread on it (a timeout mid-WAIT, say).
            connection.disconnect()
            raise
        finally:
            local.connection = None
            super().release(connection)  # type: ignore[misc]


class PinnablePool(_Pinnable, redis.ConnectionPool):
    pass


class PinnableSentinelPool(_Pinnable, SentinelConnectionPool):
    pass


def replicated(
    settings: Settings, client: redis.Redis, write: Callable[..., T], *args: Any
) -> T:
    """``write(*args)``, then WAIT on the connection it wrote on (see above).

    For phase 2's sync client, whose pool ``connect()`` made pinnable.
    """
    wait = wait_command(settings)
    if wait is None:
        return write(*args)
    pool = client.connection_pool
    assert isinstance(pool, _Pinnable), "connect() makes the pool pinnable"
    with pool.pinned():
        result = write(*args)
        try:
            acknowledged: Any = client.execute_command(*wait)  # type: ignore[no-untyped-call]
        except redis.ResponseError:  # no primary now ("used with replica")
            acknowledged = 0
    confirm(int(acknowledged), settings.redis_min_replicas)
    return result
