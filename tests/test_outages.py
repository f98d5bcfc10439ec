"""phase2_queue/outages.py: what reads as Redis trouble (a 503), and what as a
bug of ours (raised: a 500 and a traceback)."""

import re

import pytest

from common.backend import BackendUnavailable
from phase2_queue.outages import UNREACHABLE, unavailable_when_redis_is_down

# What uvloop raised in the failover test when redis-py's asyncio client wrote
# on a connection the server had just closed.
CLOSED = (
    "unable to perform operation on <TCPTransport closed=True reading=False "
    "0x55809533dcb0>; the handler is closed"
)


def test_a_transport_closed_under_the_client_is_an_outage() -> None:
    with (
        pytest.raises(BackendUnavailable, match=re.escape(UNREACHABLE)),
        unavailable_when_redis_is_down(),
    ):
        raise RuntimeError(CLOSED)


def test_any_other_runtime_error_is_ours() -> None:
    with (
        pytest.raises(RuntimeError, match="something else"),
        unavailable_when_redis_is_down(),
    ):
        raise RuntimeError("something else")
