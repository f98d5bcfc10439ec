"""What the bench needs to know of each peer: how to start its API and its worker,
how to fill its queue, how many jobs it still holds (accepted, not finished) and
how many it has finished.

Both are read in Redis by the library's own keys, from the bench's side, so one
generic loop measures every peer the same way.
"""

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from taskman.bench.figures import UNLIMITED
from taskman.phases import PHASES
from taskman.processes import taskman_command

Backlog = Callable[[redis.Redis], int]


@dataclass(frozen=True)
class Peer:
    label: str  # as the table shows it
    api: str  # the module whose create_app() uvicorn serves
    worker: Callable[[str, str], list[str]]  # (python, redis URL) -> argv
    backlog: Backlog
    finished: Backlog  # jobs finished so far (results kept, or RQ's registry)
    requires: tuple[str, ...]  # what must import under its interpreter
    # Runs under the peers' interpreter (``--peers-python``), not ours: the peers'
    # libraries pin redis-py where taskman's queue extra pins another.
    foreign: bool = True
    env: dict[str, str] = field(default_factory=dict)
    # How to put N echo jobs in its queue: the app module's fill(), through
    # ``python -m taskman.bench.peers.fill``.
    fill_module: str = ""

    def python(self, peers_python: str) -> str:
        return peers_python if self.foreign else sys.executable

    def missing(self, peers_python: str) -> str | None:
        """Why this peer cannot run (a module that does not import), or None."""
        python = self.python(peers_python)
        for module in self.requires:
            check = subprocess.run(
                [python, "-c", f"import {module}"], capture_output=True, check=False
            )
            if check.returncode:
                return f"{module} does not import under {python}"
        return None


def rq_backlog(queue: str) -> Backlog:
    """RQ's jobs not finished: waiting, taken (the intermediate list), running."""

    def backlog(connection: redis.Redis) -> int:
        key = f"rq:queue:{queue}"
        with connection.pipeline(transaction=False) as pipe:
            pipe.llen(key)
            pipe.llen(f"{key}:intermediate")
            pipe.zcard(f"rq:wip:{queue}")
            return sum(pipe.execute())

    return backlog


def rq_finished(queue: str) -> Backlog:
    def finished(connection: redis.Redis) -> int:
        return cast(int, connection.zcard(f"rq:finished:{queue}"))

    return finished


def _keys(pattern: str) -> Backlog:
    """The keys matching ``pattern``: a library's results, one key a job."""

    def count(connection: redis.Redis) -> int:
        return sum(1 for _ in connection.scan_iter(match=pattern, count=1000))

    return count


def _saq_finished(connection: redis.Redis) -> int:
    # saq keeps a finished job's key for its ttl (600 s); less the unfinished.
    return _keys("saq:job:default:*")(connection) - _saq_backlog(connection)


def _taskiq_finished(connection: redis.Redis) -> int:
    # taskiq-redis names a result by its task id alone: every key but the stream.
    keys = cast(int, connection.dbsize())
    return keys - cast(int, connection.exists("taskiq"))


def _celery_backlog(connection: redis.Redis) -> int:
    # kombu's Redis transport: the queue's list, and what workers hold unacked.
    with connection.pipeline(transaction=False) as pipe:
        pipe.llen("celery")
        pipe.hlen("unacked")
        return sum(pipe.execute())


def _arq_backlog(connection: redis.Redis) -> int:
    # A job leaves arq's sorted set when it is finished (or failed for good).
    return cast(int, connection.zcard("arq:queue"))


def _saq_backlog(connection: redis.Redis) -> int:
    return cast(int, connection.zcard("saq:default:incomplete"))


def _taskiq_backlog(connection: redis.Redis) -> int:
    # Not yet read by the group (lag) + read, not yet acked (taskiq acks once the
    # result is saved).
    try:
        groups = cast(list[dict[str, Any]], connection.xinfo_groups("taskiq"))
    except redis.ResponseError:  # no stream yet
        return 0
    if not groups:  # nobody reads them yet
        return cast(int, connection.xlen("taskiq"))
    return int(groups[0]["lag"] or 0) + int(groups[0]["pending"])


def _rq_worker(python: str, url: str) -> list[str]:
    # SimpleWorker: one process, no fork per job, like the phases' workers.
    rq = [python, "-c", "from rq.cli import main; main()"]
    return [*rq, "worker", "-w", "rq.worker.SimpleWorker", "--url", url, "--quiet"]


def _phase(phase: int) -> Peer:
    queue = f"bench-peers-phase{phase}"
    return Peer(
        label=f"taskman phase {phase}",
        api=PHASES[phase],
        worker=lambda python, url: taskman_command("worker", "--phase", str(phase)),
        backlog=rq_backlog(queue),
        finished=rq_finished(queue),
        requires=("rq",),
        foreign=False,
        env={
            "TASKMAN_QUEUE_NAME": queue,
            "TASKMAN_MAX_QUEUED": "1000000",
            **UNLIMITED,
            # Quiet, like stock RQ's --quiet: a log line per job costs a round trip.
            "TASKMAN_LOG_LEVEL": "WARNING",
        },
    )


PEERS: dict[str, Peer] = {
    "phase2": _phase(2),
    "phase3": _phase(3),
    "rq": Peer(
        label="FastAPI + stock RQ (SimpleWorker)",
        api="taskman.bench.peers.rq_app",
        worker=_rq_worker,
        backlog=rq_backlog("default"),
        finished=rq_finished("default"),
        requires=("rq",),
        foreign=False,
        fill_module="rq_app",
    ),
    "celery": Peer(
        label="FastAPI + Celery (solo pool)",
        api="taskman.bench.peers.celery_app",
        worker=lambda python, url: [
            *(python, "-m", "celery", "-A", "taskman.bench.peers.celery_app:celery"),
            *("worker", "--pool", "solo", "--loglevel", "WARNING"),
        ],
        backlog=_celery_backlog,
        finished=_keys("celery-task-meta-*"),
        requires=("celery", "redis"),
        fill_module="celery_app",
    ),
    "arq": Peer(
        label="FastAPI + arq",
        api="taskman.bench.peers.arq_app",
        worker=lambda python, url: [
            *(python, "-m", "arq", "taskman.bench.peers.arq_app.WorkerSettings")
        ],
        backlog=_arq_backlog,
        finished=_keys("arq:result:*"),
        requires=("arq",),
        fill_module="arq_app",
    ),
    "saq": Peer(
        label="FastAPI + saq (concurrency 10)",
        api="taskman.bench.peers.saq_app",
        worker=lambda python, url: [
            *(python, "-m", "saq", "taskman.bench.peers.saq_app.settings")
        ],
        backlog=_saq_backlog,
        finished=_saq_finished,
        requires=("saq",),
        fill_module="saq_app",
    ),
    "taskiq": Peer(
        label="FastAPI + taskiq (Redis stream)",
        api="taskman.bench.peers.taskiq_app",
        worker=lambda python, url: [
            *(
                python,
                "-m",
                "taskiq",
                "worker",
                "taskman.bench.peers.taskiq_app:broker",
            ),
            *("--workers", "1", "--log-level", "WARNING"),
        ],
        backlog=_taskiq_backlog,
        finished=_taskiq_finished,
        requires=("taskiq", "taskiq_redis"),
        fill_module="taskiq_app",
    ),
}
