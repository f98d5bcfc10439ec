"""The task types a client may ask for, and the functions that run them.

The functions are sync and live at module level so that RQ can import them by dotted
path and a process pool can pickle them. A client only ever names a key of
:data:`TASKS`; it can never name a function, module or path.
"""

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.context import checkpoint, current_attempt, report_progress

MAX_TEXT = 16 * 1024


class Payload(BaseModel):
    # Strict: "5" is not 5, true is not 1, unknown fields are an error.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class EchoPayload(Payload):
    value: Any

    @field_validator("value")
    @classmethod
    def _small(cls, value: Any) -> Any:
        if (
            len(json.dumps(value, allow_nan=False, ensure_ascii=False).encode())
            > MAX_TEXT
        ):
            raise ValueError(f"value must encode to at most {MAX_TEXT} bytes of JSON")
        return value


class SleepPayload(Payload):
    seconds: Annotated[float, Field(ge=0, le=60)]


class PrimesPayload(Payload):
    limit: Annotated[int, Field(ge=2, le=20_000_000)]


class HashPayload(Payload):
    data: Annotated[str, Field(max_length=MAX_TEXT)]
    iterations: Annotated[int, Field(ge=1, le=2_000_000)]


class FlakyPayload(Payload):
    fail_times: Annotated[int, Field(ge=0, le=10)]


class FailPayload(Payload):
    message: Annotated[str, Field(max_length=1024)]


def echo(value: Any) -> Any:
    """Return the value: near-zero work, so it measures the machinery itself."""
    return value


def sleep(seconds: float) -> dict[str, float]:
    """Wait, waking every few tens of milliseconds to honour a cancel."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
        checkpoint()
    return {"slept": seconds}


async def sleep_async(seconds: float) -> dict[str, float]:
    """The coroutine form of :func:`sleep`; asyncio cancellation stops it."""
    await asyncio.sleep(seconds)
    return {"slept": seconds}


def primes(limit: int) -> dict[str, int]:
    """Count the primes <= limit with a sieve of Eratosthenes (CPU-bound)."""
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    root = math.isqrt(limit)
    for p in range(2, root + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, limit + 1, p)))
            checkpoint()
            report_progress(p, root, "sieving")
    report_progress(root, root, "counting")
    return {"count": sieve.count(1)}


def hash(data: str, iterations: int) -> dict[str, str]:  # noqa: A001
    """SHA-256 chained: h0 = data as UTF-8, h(i+1) = sha256(h(i)); hex of the last."""
    digest = data.encode()
    for i in range(iterations):
        digest = hashlib.sha256(digest).digest()
        if i % 4096 == 0:
            checkpoint()
            report_progress(i, iterations)
    report_progress(iterations, iterations)
    return {"digest": digest.hex()}


def flaky(fail_times: int) -> dict[str, int]:
    """Fail the first ``fail_times`` attempts, then succeed: shows retries. A
    failing attempt reports progress first, which the next attempt starts
    without (a task's progress is its current attempt's)."""
    attempt = current_attempt()
    if attempt <= fail_times:
        report_progress(0, 1, f"attempt {attempt} is about to fail")
        raise RuntimeError(f"attempt {attempt} of {fail_times + 1} fails on purpose")
    return {"attempts": attempt}


def fail(message: str) -> None:
    """Always fail: shows the failed state."""
    raise RuntimeError(message)


@dataclass(frozen=True)
class TaskType:
    payload: type[Payload]
    run: Callable[..., Any]
    # Needs a CPU for a while: keep it away from the event loop (a process pool).
    cpu_bound: bool = False
    # A coroutine form, for runners with an event loop (phase 1).
    run_async: Callable[..., Awaitable[Any]] | None = None


TASKS: dict[str, TaskType] = {
    "echo": TaskType(EchoPayload, echo),
    "sleep": TaskType(SleepPayload, sleep, run_async=sleep_async),
    "primes": TaskType(PrimesPayload, primes, cpu_bound=True),
    "hash": TaskType(HashPayload, hash, cpu_bound=True),
    "flaky": TaskType(FlakyPayload, flaky),
    "fail": TaskType(FailPayload, fail),
}


def describe_error(error: BaseException) -> str:
    """The short, client-safe text of a failure: its type and message, no traceback."""
    message = str(error).strip().splitlines()[0][:500] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def describe_traceback(text: str) -> str:
    """describe_error()'s text, read off a traceback another process printed."""
    lines = [line for line in text.splitlines() if line.strip()]
    # Read as Python writes it: a header, the frames (indented), the exception's
    # line. The rest of a multi-line message follows and may look like anything,
    # frames included; a chained exception starts with a header of its own.
    found, in_frames = None, False
    for line in lines:
        if line == "Traceback (most recent call last):":
            in_frames = True
        elif in_frames and not line[0].isspace():
            found, in_frames = line, False
    if found is None:  # not a traceback
        found = lines[-1] if lines else "error"
    return found[:500]
