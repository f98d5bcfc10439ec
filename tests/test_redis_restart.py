"""Workers ride out Redis going away and coming back, at any moment (issue 12, 7).

Once, 0 of 100 tasks finished after a Redis restart: a worker that starts over
after losing Redis builds a new RQ worker, whose constructor already talks to
Redis; while Redis was still restarting, that raised out of run_worker and the
worker process ended. With both workers gone, every task stayed queued.
"""

import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from common.settings import Settings
from phase2_queue import create_app
from taskman.processes import children, free_port, taskman_command
from taskman.redis_server import EmbeddedRedis
from tests.conftest import FINISHED, submit, wait_for


class Workers:
    """Real ``taskman worker`` processes, one per phase given, logging to files
    that a failing test shows."""

    def __init__(self, redis_url: str, queue: str, logs: Path, *phases: int) -> None:
        env = {
            **os.environ,
            "TASKMAN_REDIS_URL": redis_url,
            "TASKMAN_QUEUE_NAME": queue,
            "TASKMAN_JOB_HEARTBEAT_SECONDS": "4",
        }
        self.logs = [
            logs / f"worker{i}-phase{phase}.log" for i, phase in enumerate(phases)
        ]
        self.processes: list[subprocess.Popen[bytes]] = []
        for phase, log in zip(phases, self.logs, strict=True):
            with open(log, "wb") as out:
                self.processes.append(
                    subprocess.Popen(
                        taskman_command("worker", "--phase", str(phase)),
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

    def assert_alive(self, when: str) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"{log.name} exited ({process.returncode}) {when}:\n{tail}")

    def kill(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, not started: the test starts and kills it."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    yield server
    server.stop(kill=True)


def test_a_worker_that_finds_redis_away_waits_for_it_and_then_works(
    redis_server: EmbeddedRedis, logs: Path
) -> None:
    # The window of a start-over held open: Redis refuses every connection for
    # longer than redis-py's retries last (3, backoff at most 2 + 4 + 8 s).
    queue = f"q{uuid.uuid4().hex[:8]}"
    workers = Workers(redis_server.url, queue, logs, 2, 3)
    try:
        refused_until = time.monotonic() + 16
        while time.monotonic() < refused_until:
            workers.assert_alive("while Redis was away")
            time.sleep(0.5)
        redis_server.start()
        settings = Settings(redis_url=redis_server.url, queue_name=queue)
        with TestClient(create_app(settings)) as client:
            ids = [submit(client, "sleep", seconds=0.5)["id"] for _ in range(4)]
            for task_id in ids:
                assert wait_for(client, task_id, timeout=30)["status"] == "succeeded"
        workers.assert_alive("after Redis came")
    finally:
        workers.kill()


def test_tasks_all_finish_through_redis_kills_at_random_moments(
    redis_server: EmbeddedRedis, logs: Path
) -> None:
    """The soak: 100 sleep 0.2 tasks on two workers (one of each queued phase),
    Redis SIGKILLed at three random moments while they run and restarted after a
    random outage; no worker may end, and every task finishes."""
    rng = random.Random()
    redis_server.start()
    queue = f"q{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_server.url, queue_name=queue)
    workers = Workers(redis_server.url, queue, logs, 2, 3)
    try:
        with TestClient(create_app(settings)) as client:
            ids = [submit(client, "sleep", seconds=0.2)["id"] for _ in range(100)]
            # appendfsync everysec: what got a 202 a second ago is on disk. Later
            # kills may lose a second of the workers' writes; those jobs are
            # taken back by the heartbeat and dequeue rescues (recovery.py).
            time.sleep(1.5)
            for _ in range(3):
                time.sleep(rng.uniform(0.2, 3.0))
                redis_server.stop(kill=True)
                time.sleep(rng.uniform(0.1, 2.5))
                redis_server.start()
            deadline = time.monotonic() + 35
            while True:
                statuses = Counter(
                    client.get(f"/tasks/{task_id}").json()["status"] for task_id in ids
                )
                finished = sum(statuses[status] for status in FINISHED)
                if finished == len(ids) or time.monotonic() > deadline:
                    break
                workers.assert_alive("after the restarts")
                time.sleep(0.5)
        workers.assert_alive("after the restarts")
        assert finished == len(ids), dict(statuses)
    finally:
        workers.kill()


def test_a_worker_that_redis_forgot_in_a_restart_registers_again(
    redis_server: EmbeddedRedis, logs: Path
) -> None:
    # A restart that lost the workers' registration: here all of Redis's data
    # (appendfsync everysec loses the last second; a Redis without its disk, all).
    redis_server.start()
    queue = f"q{uuid.uuid4().hex[:8]}"
    registered = f"rq:workers:{queue}"
    workers = Workers(redis_server.url, queue, logs, 2, 3)
    try:
        client = redis.Redis.from_url(redis_server.url)
        _wait_until(lambda: client.scard(registered) == 2, "both workers register")
        redis_server.stop(kill=True)
        shutil.rmtree(redis_server.data_dir)
        redis_server.start()
        client = redis.Redis.from_url(redis_server.url)
        _wait_until(lambda: client.scard(registered) == 2, "both register again")
        for key in client.smembers(registered):
            assert client.ttl(key) > 0  # it still expires if the worker dies
        workers.assert_alive("after the restart")
    finally:
        workers.kill()


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def test_a_worker_whose_scheduler_will_not_stop_still_stops(
    redis_server: EmbeddedRedis, logs: Path
) -> None:
    # RQ waits for its scheduler process without a bound, in the teardown that
    # every start-over after a lost Redis goes through. A stopped process stands
    # in for one that never ends (one forked while another thread held a lock).
    redis_server.start()
    workers = Workers(redis_server.url, f"q{uuid.uuid4().hex[:8]}", logs, 2)
    worker = workers.processes[0]
    _wait_until(lambda: bool(children(worker.pid)), "the scheduler starts")
    (scheduler,) = children(worker.pid)
    try:
        os.kill(scheduler, signal.SIGSTOP)
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker waits for its stuck scheduler forever")
    finally:
        with suppress(ProcessLookupError):  # the worker has killed it
            os.kill(scheduler, signal.SIGKILL)
        workers.kill()
