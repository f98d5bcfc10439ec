"""Phase 3 as it is served, for chaos to shoot at: Redis, the API under uvicorn, and
``taskman worker`` processes, each logging to the run directory; and what RQ's
keys in Redis say about them."""

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from phase2_queue.jobs import PRIORITY_SUFFIX
from taskman.phases import PHASES
from taskman.processes import (
    Process,
    alive,
    children,
    send,
    start,
    start_api,
    start_time,
    stop,
    stop_tree,
    taskman_command,
    wait_healthy,
)
from taskman.redis_server import EmbeddedRedis, free_port

PHASE = 3  # the phase under fire
QUEUE = "taskman"
# Its three queues (high, normal, low: phase2_queue/jobs.py); every worker listens
# on all three, so it is in each one's worker set.
QUEUES = [QUEUE + suffix for suffix in PRIORITY_SUFFIX.values()]
# What a worker logs when it takes a job off the queue (RQ's own INFO line).
DEQUEUED = re.compile(r"Worker (\w+): [^:]+: taskman \w+ task \(([0-9a-f]{32})\)")


class Cluster:
    """The processes of one run; ``running()`` starts and stops them all."""

    def __init__(self, run_dir: Path, workers: int) -> None:
        self.run_dir = run_dir
        self.worker_count = workers
        self.redis = EmbeddedRedis(run_dir / "redis", port=free_port())
        self.workers: list[Worker] = []
        self.retired: list[Worker] = []  # killed

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TASKMAN_REDIS_URL": self.redis.url,
            "TASKMAN_QUEUE_NAME": QUEUE,
            "TASKMAN_MAX_RETRIES": "3",
            # Short retries and heartbeats: a run of minutes, not hours.
            "TASKMAN_RETRY_BACKOFF": "0.2",
            "TASKMAN_JOB_HEARTBEAT_SECONDS": "4",
            # The chaos client is one client: it must not be rate-limited.
            "TASKMAN_RATE_LIMIT_SUBMIT": "1000000/second",
            "TASKMAN_RATE_LIMIT_READ": "1000000/second",
            # INFO: each worker logs every job it dequeues, the ledger of deliveries.
            "TASKMAN_LOG_LEVEL": "INFO",
        }

    @contextmanager
    def running(self) -> Iterator[str]:
        """Everything up (the API's URL), then stopped: workers, API, Redis."""
        with ExitStack() as stack:
            self.redis.start()
            stack.callback(self.redis.stop)
            # The phase-3 API under uvicorn, as it is served; in a directory of
            # ours, so no stray .env file from wherever we were started is read.
            api, url = start_api(
                PHASES[PHASE],
                self.env(),
                cwd=self.run_dir,
                log=self.run_dir / "api.log",
            )
            stack.callback(stop, api)
            for _ in range(self.worker_count):
                self.start_worker()
            stack.callback(self.stop_workers)
            wait_healthy(url, api)
            self.wait_for_workers()
            yield url

    def start_worker(self) -> None:
        number = len(self.workers) + len(self.retired) + 1
        self.workers.append(Worker(number, self.env(), self.run_dir))

    def kill_worker(self, victim: "Worker") -> None:
        """kill -9 one worker, and start another in its place."""
        victim.kill()
        self.workers.remove(victim)
        self.retired.append(victim)
        self.start_worker()

    def wait_for_workers(self, timeout: float = 60) -> None:
        # Any: redis-py's sync methods are typed as "maybe awaitable".
        connection: Any = redis.Redis.from_url(self.redis.url)
        deadline = time.monotonic() + timeout
        try:
            while connection.scard(f"rq:workers:{QUEUE}") < self.worker_count:
                if time.monotonic() > deadline:
                    raise TimeoutError("the workers never registered")
                time.sleep(0.1)
        finally:
            connection.close()

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()

    def orphans(self) -> int:
        """Children of killed workers still alive (RQ's scheduler is a forked child:
        a SIGKILL of the worker leaves it running). Ours: we stop them."""
        left = [
            (pid, at) for w in self.retired for pid, at in w.children if alive(pid, at)
        ]
        for pid, at in left:
            send(pid, signal.SIGTERM, at)
        return len(left)

    def deliveries(self) -> Counter[str]:
        """How many times any worker took each task off the queue, from their logs."""
        counts: Counter[str] = Counter()
        for worker in self.workers + self.retired:
            for match in DEQUEUED.finditer(worker.log_text()):
                counts[match[2]] += 1
        return counts

    def leftovers(self) -> dict[str, int]:
        connection = redis.Redis.from_url(self.redis.url)
        try:
            with connection.pipeline(transaction=False) as pipe:
                for queue in QUEUES:
                    pipe.llen(f"rq:queue:{queue}")
                    pipe.llen(f"rq:queue:{queue}:intermediate")
                    pipe.zcard(f"rq:wip:{queue}")
                    pipe.zcard(f"rq:scheduled:{queue}")
                counts = pipe.execute()
        finally:
            connection.close()
        names = ("queued", "intermediate", "started", "scheduled")
        return {name: sum(counts[n :: len(names)]) for n, name in enumerate(names)}

    def stuck_detail(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Where RQ has each stuck task: its hash fields and the lists it is in."""
        if not ids:
            return {}
        connection: Any = redis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            queued, intermediate, started, scheduled = set(), set(), set(), set()
            for queue in QUEUES:
                queued |= set(connection.lrange(f"rq:queue:{queue}", 0, -1))
                intermediate |= set(
                    connection.lrange(f"rq:queue:{queue}:intermediate", 0, -1)
                )
                started |= {
                    m.split(":")[0] for m in connection.zrange(f"rq:wip:{queue}", 0, -1)
                }
                scheduled |= set(connection.zrange(f"rq:scheduled:{queue}", 0, -1))
            detail = {}
            for task_id in ids:
                fields = connection.hmget(
                    f"rq:job:{task_id}",
                    ["status", "attempts", "retries_left", "worker_name"],
                )
                places = [
                    name
                    for name, members in (
                        ("queue", queued),
                        ("intermediate", intermediate),
                        ("wip", started),
                        ("scheduled", scheduled),
                    )
                    if task_id in members
                ]
                detail[task_id] = {
                    "status": fields[0],
                    "attempts": fields[1],
                    "retries_left": fields[2],
                    "worker": fields[3],
                    "in": places,
                }
            detail["_locks"] = {
                key: connection.ttl(key)
                for key in connection.keys("rq:*lock*")
                + connection.keys("rq:clean_registries:*")
            }
            return detail
        finally:
            connection.close()


async def running_jobs(conn: aioredis.Redis) -> list[str]:
    """Jobs a worker holds right now: started, or dequeued and about to start."""
    try:
        async with conn.pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                pipe.zrange(f"rq:wip:{queue}", 0, -1)
                pipe.lrange(f"rq:queue:{queue}:intermediate", 0, -1)
            replies = await pipe.execute()
    except redis.RedisError:
        return []
    started = [m for reply in replies[0::2] for m in reply]
    dequeued = [m for reply in replies[1::2] for m in reply]
    return [m.decode().split(":")[0] for m in started] + [m.decode() for m in dequeued]


class Worker:
    """One ``taskman worker --phase 3`` process, its log in the run directory."""

    def __init__(self, number: int, env: dict[str, str], run_dir: Path) -> None:
        self.name = f"worker-{number}"
        self.path = run_dir / f"{self.name}.log"
        self.process: Process = start(
            taskman_command("worker", "--phase", str(PHASE)),
            env=env,
            cwd=run_dir,
            log=self.path,
        )
        self.pid = self.process.pid
        self.born = time.monotonic()
        # Its children when it was killed, as (pid, start time): pids are reused.
        self.children: list[tuple[int, int]] = []

    @property
    def age(self) -> float:
        return time.monotonic() - self.born

    @property
    def last_dequeued(self) -> str | None:
        found = DEQUEUED.findall(self.log_text())
        return found[-1][1] if found else None

    def log_text(self) -> str:
        return self.path.read_text(errors="replace")

    def kill(self) -> None:
        self.children = [
            (pid, at)
            for pid in children(self.pid)
            if (at := start_time(pid)) is not None
        ]
        stop(self.process, kill=True)

    def stop(self) -> None:
        """RQ's warm shutdown (SIGTERM); SIGKILL if it takes too long, and of what
        it leaves running."""
        stop_tree(self.process, timeout=10)
