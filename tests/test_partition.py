"""A worker cut off from Redis mid-task (issue 13, item 4). Redis, the API, two
workers and the test's client each on a host of their own (network namespaces,
taskman/netns.py); the worker running a task loses its link, then gets it back.

Its task must be taken back and finished by the other worker while it is away;
when the link comes back the stale worker must not write its outcome over the
newer one (the claim of phase2_queue/worker.py), and must go on taking tasks.
Each test runs phases 2 and 3 at once, each on a network of its own: the waits
are the network's, not the machine's, and so take half the time.
"""

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from taskman import netns
from taskman.netns import Network
from taskman.phases import PHASES
from taskman.processes import Process, stop_tree, taskman_command

REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(
    REASON is not None, reason=f"cannot make network namespaces here: {REASON}"
)

WORKERS = ("w1", "w2")


class Scene:
    """The hosts and their processes, and the reads the test makes of them, all
    from the client's host (the thread that made the scene)."""

    def __init__(self, net: Network, api: httpx.Client, store: redis.Redis) -> None:
        self.net, self.api, self.store = net, api, store
        self.workers: dict[str, Process] = {}
        self.logs: dict[str, Path] = {}

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.api.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    def submit(self, seconds: float) -> str:
        body = {"type": "sleep", "payload": {"seconds": seconds}}
        response = self.api.post("/tasks", json=body)
        assert response.status_code == 202, response.text
        task_id: str = response.json()["id"]
        return task_id

    def until(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not (found := check()):
            if time.monotonic() > deadline:
                pytest.fail(f"{self.net.switch}: not within {timeout:.1f} s: {what}")
            time.sleep(0.1)
        return found

    def host_of(self, task_id: str) -> str | None:
        """The host of the worker the job was last started by (by its pid)."""
        name: Any = self.store.hget(f"rq:job:{task_id}", "worker_name")
        pid: Any = name and self.store.hget(f"rq:worker:{name.decode()}", "pid")
        for role, process in self.workers.items():
            if pid and int(pid) == process.pid:
                return role
        return None

    def live_workers(self) -> int:
        workers: int = self.api.get("/health").json().get("workers", 0)
        return workers

    def start_task(self, seconds: float) -> tuple[str, str, str]:
        """A task running on one worker; its id, that worker's host, the other's."""
        task_id = self.submit(seconds)
        self.until("it runs", lambda: self.task(task_id)["status"] == "running", 10)
        runner = self.until("its worker is known", lambda: self.host_of(task_id), 5)
        other = next(role for role in WORKERS if role != runner)
        return task_id, runner, other

    def serves_again(self, stale: str) -> None:
        """With more tasks than workers, the stale worker takes some too."""
        ids = [self.submit(0.5) for _ in range(6)]
        self.until(
            "the tasks after the partition finish",
            lambda: all(self.task(i)["status"] == "succeeded" for i in ids),
            20,
        )
        assert stale in {self.host_of(i) for i in ids}


@contextmanager
def scene(phase: int, logs: Path, heartbeat: int) -> Iterator[Scene]:
    """Redis, the API and two workers of ``phase``, each on its own host; the
    calling thread on the client's host until the end."""
    roles = ["redis", "api", *WORKERS, "client"]
    with Network(roles) as net, ExitStack() as stack, net.inside("client"):
        server = net.redis("redis", logs / "redis")
        stack.callback(server.stop)
        env = {
            **os.environ,
            "TASKMAN_REDIS_URL": server.url,
            "TASKMAN_QUEUE_NAME": "partition",
            "TASKMAN_RETRY_BACKOFF": "0",
            "TASKMAN_JOB_HEARTBEAT_SECONDS": str(heartbeat),
            "TASKMAN_RATE_LIMIT_SUBMIT": "1000/second",
        }
        api, url = net.api("api", PHASES[phase], env, log=logs / "api.log")
        stack.callback(stop_tree, api)
        client = stack.enter_context(httpx.Client(base_url=url, timeout=10))
        store = stack.enter_context(redis.Redis.from_url(server.url))
        found = Scene(net, client, store)
        for role in WORKERS:
            command = taskman_command("worker", "--phase", str(phase))
            found.logs[role] = logs / f"{role}.log"
            worker = net.start(role, command, env=env, log=found.logs[role])
            stack.callback(stop_tree, worker, 5)
            found.workers[role] = worker
        net.wait_healthy("client", url, api)
        found.until("both workers up", lambda: found.live_workers() == 2, 30)
        yield found


def both_phases(scenario: Callable[[int], None]) -> None:
    """Run ``scenario`` for phases 2 and 3 at once; fail with each one's failure."""
    with ThreadPoolExecutor(2) as pool:
        futures = {phase: pool.submit(scenario, phase) for phase in (2, 3)}
    failures = {p: f.exception() for p, f in futures.items() if f.exception()}
    if failures:
        first = next(iter(failures.values()))
        report = "; ".join(f"phase {p}: {e}" for p, e in failures.items())
        raise AssertionError(report) from first


def test_a_task_cut_off_for_30s_is_finished_elsewhere_and_never_overwritten(
    tmp_path: Path,
) -> None:
    # Mid-run when the link goes; the other worker takes it back after the 10 s
    # heartbeat TTL (and at most one 5 s clean-up), and finishes it before the
    # link comes back. The stale run dies in the partition: its task's cancel
    # check, then its report, find no Redis; its worker starts over on the heal.
    partition, sleep = 30.0, 8.0

    def scenario(phase: int) -> None:
        with scene(phase, tmp_path / f"phase{phase}", heartbeat=10) as s:
            task_id, stale, other = s.start_task(sleep)
            time.sleep(1)  # mid-run
            s.net.partition(stale)
            cut = time.monotonic()
            try:
                s.until(
                    "the task is run again by the other worker",
                    lambda: s.host_of(task_id) == other,
                    partition - sleep - 3,
                )
                done = s.until(
                    "the task finishes there",
                    lambda: (t := s.task(task_id))["status"] == "succeeded" and t,
                    partition - (time.monotonic() - cut) - 0.5,
                )
                assert (done["attempts"], done["result"]) == (2, {"slept": sleep})
                time.sleep(max(0.0, partition - (time.monotonic() - cut)))
            finally:
                s.net.heal(stale)
            # Back: a new RQ worker in the same process; the newer outcome stands.
            s.until("both workers live again", lambda: s.live_workers() == 2, 40)
            assert s.task(task_id) == done
            s.serves_again(stale)
            assert s.task(task_id) == done

    both_phases(scenario)


def test_a_stale_workers_late_outcome_is_refused_after_a_short_partition(
    tmp_path: Path,
) -> None:
    # A partition shorter than a Redis read timeout (15 s): the stale run lives
    # through it, stuck in its task's cancel check, and reports when the link is
    # back, after the other worker (4 s heartbeats here) has finished the task.
    partition, sleep = 13.0, 2.0

    def scenario(phase: int) -> None:
        with scene(phase, tmp_path / f"phase{phase}", heartbeat=4) as s:
            task_id, stale, other = s.start_task(sleep)
            time.sleep(0.5)
            s.net.partition(stale)
            cut = time.monotonic()
            try:
                done = s.until(
                    "the task finishes on the other worker",
                    lambda: (t := s.task(task_id))["status"] == "succeeded" and t,
                    partition - 0.5,
                )
                assert s.host_of(task_id) == other
                time.sleep(max(0.0, partition - (time.monotonic() - cut)))
            finally:
                s.net.heal(stale)
            refused = f"job {task_id} moved on: this run's outcome is dropped"
            s.until(
                "the stale worker's claim is refused",
                lambda: refused in s.logs[stale].read_text(),
                20,
            )
            assert s.task(task_id) == done
            assert s.host_of(task_id) == other
            s.serves_again(stale)

    both_phases(scenario)
