"""What the API answers when Redis is away, or there but refusing: a 503 with
Retry-After (common/errors.py), whose message says which of the two it is, and
never a 500. Every phase-2 and phase-3 call to Redis on behalf of a request runs
inside :func:`unavailable_when_redis_is_down`.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError

from common.backend import BackendUnavailable

# Redis is up but will not write: out of memory (maxmemory, noeviction), a read-only
# replica, or unable to persist (MISCONF: its disk is full).
REFUSING_WRITES = "the queue (Redis) refuses writes for now; retry shortly"
UNREACHABLE = "the queue (Redis) is unreachable; retry shortly"
AUTHENTICATION_FAILED = (
    "the queue (Redis) refused our credentials: authentication failed "
    "(check the user and password of TASKMAN_REDIS_URL)"
)


@contextmanager
def unavailable_when_redis_is_down() -> Iterator[None]:
    """503 (with Retry-After) for a Redis that is away, or there but refusing."""
    try:
        yield
    # Before ConnectionError, whose subclass it is: a wrong password is no outage,
    # and whoever reads the 503 should know which to fix. Never the URL itself.
    except (
        redis.AuthenticationError,
        redis.AuthenticationWrongNumberOfArgsError,
    ) as error:
        raise BackendUnavailable(AUTHENTICATION_FAILED) from error
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise BackendUnavailable(UNREACHABLE) from error
    except RuntimeError as error:
        # uvloop's word for a socket closed under redis-py's asyncio client as it
        # wrote (a failover: tests/test_failover.py); any other is ours, a 500.
        if "handler is closed" not in str(error):
            raise
        raise BackendUnavailable(UNREACHABLE) from error
    except (OutOfMemoryError, ReadOnlyError) as error:
        raise BackendUnavailable(REFUSING_WRITES) from error
    except redis.ResponseError as error:
        if str(error).startswith(("MISCONF", "NOREPLICAS")):
            raise BackendUnavailable(REFUSING_WRITES) from error
        raise  # anything else is a bug of ours: a 500, and a traceback in the log
