"""What a running task may ask of whoever runs it: its attempt number, whether it
has been canceled, and to tell how far it has come.

Task functions are plain sync functions, run by an asyncio loop, a process pool or
an RQ worker. Each runner opens a :func:`task_context` around the call; the function
calls :func:`checkpoint` now and then and stops with :class:`TaskCanceled` when the
runner's ``is_canceled`` says so. That is cooperative cancellation: nothing is
killed mid-write, and the same functions work under every phase.

Progress goes the same way: the function calls :func:`report_progress` as often as
it likes; at most every ``PROGRESS_INTERVAL`` seconds (and at the end) it reaches
the runner's ``on_progress``, which may write to Redis (phase 2 keeps it in the
job's ``meta``, RQ's place for it).
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

# How often checkpoint() really asks; asking may cost a Redis round trip.
CHECK_INTERVAL = 0.05
# How often a report of progress reaches the runner (a Redis write, in phase 2).
PROGRESS_INTERVAL = 0.2

ProgressCallback = Callable[[int, int, str | None], None]


class TaskCanceled(Exception):
    """Raised inside a task function whose task was canceled."""


def _ignore_progress(done: int, total: int, message: str | None) -> None:
    pass


@dataclass
class _Context:
    attempt: int
    is_canceled: Callable[[], bool]
    on_progress: ProgressCallback = _ignore_progress
    last_check: float = 0.0
    last_progress: float = 0.0


_current: ContextVar[_Context | None] = ContextVar("taskman_task", default=None)


@contextmanager
def task_context(
    attempt: int,
    is_canceled: Callable[[], bool] = lambda: False,
    on_progress: ProgressCallback = _ignore_progress,
) -> Iterator[None]:
    """Run the enclosed task call as attempt ``attempt``, cancelable by a callback,
    its progress reported to another."""
    token = _current.set(_Context(attempt, is_canceled, on_progress))
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


def report_progress(done: int, total: int, message: str | None = None) -> None:
    """Tell the runner that ``done`` of ``total`` steps are done; cheap to call
    often (reports closer together than PROGRESS_INTERVAL are dropped, but never
    the last one, ``done == total``)."""
    context = _current.get()
    if context is None:
        return
    now = time.monotonic()
    if done < total and now - context.last_progress < PROGRESS_INTERVAL:
        return
    context.last_progress = now
    context.on_progress(done, total, message)
