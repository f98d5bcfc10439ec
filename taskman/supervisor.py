"""Keep N worker processes running: one that dies is started again, after a pause
that doubles while it keeps dying, and all are stopped warm, then killed, on exit.

Not RQ's WorkerPool (``rq.worker_pool``, ``rq worker-pool``), though it does the
same job. Its children run RQ's bare loop (``worker.work()`` on the queue names and
connection it hands over), not a phase's ``run_worker``, which starts over when
Redis goes away and sets our heartbeat TTL, worker TTL, maintenance interval and
scheduler name; it forks the supervising process (for ``taskman serve``, one
running uvicorn and its threads); it respawns each second with no backoff; and its
stop is a SIGINT with no deadline. Ours starts each worker as ``taskman worker``,
a fresh interpreter running its phase's own loop.
"""

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from taskman.processes import Process, start

log = logging.getLogger("taskman")


@dataclass(frozen=True)
class Backoff:
    """How long a dead worker's place waits before it is started again."""

    first: float = 0.5
    most: float = 10.0
    # A worker that lived this long died of something new: start over from first.
    stable: float = 30.0


@dataclass
class _Place:
    number: int  # 1..N, for the log
    delay: float
    process: Process | None = None
    started_at: float = 0.0
    start_at: float = 0.0  # when to start it (again)
    done: bool = False  # a burst worker that ran the queue dry


class Supervisor:
    """``count`` copies of ``argv``, each started again when it dies.

    One thread starts, watches and stops every child. It has to be one thread:
    a child asks Linux for SIGTERM when its parent dies (processes.start's
    ``own_session``), and "parent" means the thread that started it. A second
    SIGTERM turns RQ's warm shutdown cold, so the thread outlives the stop.
    """

    def __init__(
        self,
        argv: Sequence[str],
        count: int,
        *,
        burst: bool = False,
        grace: float = 10.0,
        backoff: Backoff = Backoff(),
        poll: float = 0.1,
    ) -> None:
        self._argv = list(argv)
        self._burst = burst
        self._grace = grace
        self._backoff = backoff
        self._poll = poll
        self._places = [_Place(n + 1, backoff.first) for n in range(count)]
        self._stopping = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="supervisor")

    def __enter__(self) -> "Supervisor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        """The workers running now."""
        with self._lock:
            return [p.process.pid for p in self._places if p.process is not None]

    def wait(self) -> None:
        """Until every worker is done: burst workers that ran the queue dry (else
        until stopped). A signal handler still runs meanwhile.

        An Event, not Thread.join(): on Python 3.11 a join that a signal handler
        interrupts (our SIGTERM's sys.exit) marks the thread as ended (threading's
        bpo-45274 clean-up), and then nobody waits for the workers to stop.
        """
        if self._thread.ident is None:
            return  # never started
        while not self._finished.wait(timeout=0.5):
            pass

    def stop(self) -> None:
        """Stop the workers: RQ's warm shutdown, then a kill after the grace."""
        self._stopping.set()
        self.wait()

    # --- the supervising thread

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._watch(time.monotonic()):
                    return  # every burst worker is done
                self._stopping.wait(self._poll)
        finally:
            self._stop_all()
            self._finished.set()

    def _watch(self, now: float) -> bool:
        """Reap the dead, start what is due; whether any place is still busy."""
        for place in self._places:
            if place.done:
                continue
            if place.process is None:
                if now >= place.start_at:
                    self._start(place, now)
                continue
            code = place.process.poll()
            if code is None:
                continue
            with self._lock:
                place.process = None
            lived = now - place.started_at
            if self._burst and code == 0:
                place.done = True
                continue
            if lived >= self._backoff.stable:
                place.delay = self._backoff.first
            log.warning(
                "worker %d exited with %s after %.1f s; restarting in %.1f s",
                place.number,
                _describe(code),
                lived,
                place.delay,
            )
            place.start_at = now + place.delay
            place.delay = min(place.delay * 2, self._backoff.most)
        return not all(place.done for place in self._places)

    def _start(self, place: _Place, now: float) -> None:
        # A session of its own: a Ctrl-C in the terminal reaches us, not the
        # workers, so we stop them (a worker stopped behind our back would be
        # taken for dead and started again). Its output is ours: our terminal.
        process = start(self._argv, log=None, own_session=True)
        with self._lock:
            place.process, place.started_at = process, now
        log.info("worker %d started (pid %d)", place.number, process.pid)

    def _stop_all(self) -> None:
        with self._lock:
            running = [p.process for p in self._places if p.process is not None]
        # All at once, one deadline: RQ's warm shutdown lets each finish its task.
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._grace
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Its task is cut short; the job goes back to the queue.
                process.kill()
                process.wait()
        with self._lock:
            for place in self._places:
                place.process = None


def _describe(code: int) -> str:
    """An exit code as a person reads it: "code 1", "SIGKILL"."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
