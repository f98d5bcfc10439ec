"""Engine room: the asyncio Redis client of the API's hot path.

Phase 2 calls sync redis-py from a thread; here the event loop talks to Redis
itself, with no thread hand-off per call.

Two changes to redis-py's defaults, both measured on POST /tasks:

- Fail fast: a refused connection is a 503 the client retries, not three retries
  with backoff inside the request.
- Commands are packed by hiredis, in C. redis-py's sync client does this whenever
  hiredis is installed; its asyncio client always packs in Python, ~6 µs for the
  enqueue's arguments against ~1 µs (the hiredis packer is redis-py's own).
"""

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer

from common.settings import Settings
from phase2_queue.jobs import sentinel_addresses, sentinel_options, url_options


def connect_async(
    settings: Settings, timeout: float = 5, connect_timeout: float = 1
) -> aioredis.Redis:
    """One quick retry only: it survives a connection that went stale when Redis
    restarted (or a failover moved the primary), and fails fast when Redis is away.

    The one place every asyncio client is made (the backend, the cache, the rate
    limiter): with TASKMAN_REDIS_SENTINELS, a pool whose connections ask the
    sentinels for the primary, each time one (re)connects.
    """
    options: dict[str, Any] = dict(
        socket_connect_timeout=connect_timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
    )
    if settings.redis_sentinels:
        url = url_options(settings)
        sentinels = Sentinel(  # type: ignore[no-untyped-call]
            sentinel_addresses(settings),
            sentinel_kwargs=sentinel_options(url),
            **url,
        )
        assert settings.redis_sentinel_master  # the settings check both are set
        client: aioredis.Redis = sentinels.master_for(
            settings.redis_sentinel_master, **options
        )
        pool = client.connection_pool
    else:
        if not settings.redis_url:
            raise RuntimeError("set TASKMAN_REDIS_URL or TASKMAN_REDIS_SENTINELS")
        pool = aioredis.ConnectionPool.from_url(settings.redis_url, **options)
        client = aioredis.Redis(connection_pool=pool)
    # from_url (or Sentinel) picked the class: TCP, TLS or a Unix socket.
    pool.connection_class = _packed_by_hiredis(pool.connection_class)
    return client


_PACKER = HiredisRespSerializer()


def _packed_by_hiredis(
    connection_class: type[aioredis.connection.AbstractConnection],
) -> type[aioredis.connection.AbstractConnection]:
    class HiredisPacked(connection_class):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            packed: list[bytes] = _PACKER.pack(*args)
            return packed

    HiredisPacked.__name__ = f"HiredisPacked{connection_class.__name__}"
    return HiredisPacked
