"""The process pool that keeps CPU-bound tasks off the event loop.

Threads would not do: they share the GIL with the loop. Processes do, but on a
2-core machine a pool as large as the machine still starves the loop, so the pool
(a) leaves a core to it by default and (b) runs at the lowest CPU priority, so the
kernel always prefers the loop when they compete. docs/phase1.md has the numbers.

A task's progress (common/context.py's report_progress) crosses back on a pipe
that the event loop watches (``add_reader``): no thread, no poll.
"""

import asyncio
import ctypes
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from common.context import ProgressCallback, task_context
from common.process import die_with_parent
from common.tasks import TASKS

# One byte per pool slot in shared memory: the parent sets it to cancel the task
# running in that slot, the child reads it at each checkpoint(). No IPC round trip.
_cancel_flags: Any = None
# The write end of the progress pipe, shared by every child, and the lock that
# keeps two children's messages from interleaving on it.
_progress: Any = None
_progress_lock: Any = None


def _init_child(cancel_flags: Any, progress: Any, lock: Any, parent: int) -> None:
    global _cancel_flags, _progress, _progress_lock
    _cancel_flags, _progress, _progress_lock = cancel_flags, progress, lock
    os.nice(19)
    # Ctrl-C reaches the whole process group; only the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Die with the parent, even if it is SIGKILLed, and even if that happened while
    # we were starting: an orphan would wait forever for work (it holds the pool's
    # queue open itself), and keep multiprocessing's resource tracker alive.
    die_with_parent(parent=parent)


def _run_in_child(
    type_name: str, payload: dict[str, Any], attempt: int, slot: int
) -> Any:
    def is_canceled() -> bool:
        return bool(_cancel_flags[slot])

    def on_progress(done: int, total: int, message: str | None) -> None:
        # report_progress() throttles this to a few messages a second.
        with _progress_lock:
            _progress.send((slot, done, total, message))

    with task_context(attempt, is_canceled, on_progress):
        return TASKS[type_name].run(**payload)


class CpuPool:
    """``size`` worker processes; slot ``i`` is used by one caller at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._flags = multiprocessing.RawArray(ctypes.c_bool, size)
        # spawn, not fork: a forked child would inherit uvicorn's signal handlers
        # and copies of its sockets, and was seen to outlive the server.
        context = multiprocessing.get_context("spawn")
        self._progress, progress = context.Pipe(duplex=False)
        self._listeners: dict[int, ProgressCallback] = {}  # slot -> its caller's
        self._executor = ProcessPoolExecutor(
            size,
            mp_context=context,
            initializer=_init_child,
            initargs=(self._flags, progress, context.Lock(), os.getpid()),
        )
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._progress.fileno(), self._read_progress)

    async def run(
        self,
        slot: int,
        type_name: str,
        payload: dict[str, Any],
        attempt: int,
        on_progress: ProgressCallback,
    ) -> Any:
        """Run a task function in the pool, its progress reported to ``on_progress``;
        TaskCanceled if cancel(slot) was called."""
        self._flags[slot] = False
        self._listeners[slot] = on_progress
        try:
            return await self._loop.run_in_executor(
                self._executor, _run_in_child, type_name, payload, attempt, slot
            )
        finally:
            # The child wrote its last progress before it answered: read it now,
            # so it reaches this task (not the slot's next one) before its end.
            self._read_progress()
            del self._listeners[slot]

    def _read_progress(self) -> None:
        while self._progress.poll():
            slot, done, total, message = self._progress.recv()
            listener = self._listeners.get(slot)
            if listener is not None:  # else its caller is gone (shutting down)
                listener(done, total, message)

    def cancel(self, slot: int) -> None:
        self._flags[slot] = True

    async def aclose(self) -> None:
        for slot in range(self.size):
            self.cancel(slot)
        # Blocks until the children exit: off the loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._loop.remove_reader(self._progress.fileno())
        self._progress.close()
