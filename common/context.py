"""What a running task may ask of whoever runs it: its attempt number, and whether
it has been canceled.

Task functions are plain sync functions, run by an asyncio loop, a process pool or
an RQ worker. Each runner opens a :func:`task_context` around the call; the function
calls :func:`checkpoint` now and then and stops with :class:`TaskCanceled` when the
runner's ``is_canceled`` says so. That is cooperative cancellation: nothing is
killed mid-write, and the same functions work under every phase.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

# How often checkpoint() really asks; asking may cost a Redis round trip.
CHECK_INTERVAL = 0.05


class TaskCanceled(Exception):
    """Raised inside a task function whose task was canceled."""


@dataclass
class _Context:
    attempt: int
    is_canceled: Callable[[], bool]
    last_check: float = 0.0


_current: ContextVar[_Context | None] = ContextVar("taskman_task", default=None)


@contextmanager
def task_context(
    attempt: int, is_canceled: Callable[[], bool] = lambda: False
) -> Iterator[None]:
    """Run the enclosed task call as attempt ``attempt``, cancelable by a callback."""
    token = _current.set(_Context(attempt, is_canceled))
    try:
        yield
    finally:
        _current.reset(token)


def current_attempt() -> int:
    """The 1-based attempt number of the running task (1 outside any runner)."""
    context = _current.get()
    return context.attempt if context else 1


def checkpoint() -> None:
    """Raise TaskCanceled if the running task was canceled; cheap to call often."""
    context = _current.get()
    if context is None:
        return
    now = time.monotonic()
    if now - context.last_check < CHECK_INTERVAL:
        return
    context.last_check = now
    if context.is_canceled():
        raise TaskCanceled("task canceled")
