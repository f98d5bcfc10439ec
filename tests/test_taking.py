"""Phase 2's take (phase2_queue/taking.py): RQ's one-queue LMOVE on each of the
three queues, so a job is in an intermediate list from the moment it leaves its
queue; an idle worker waits on the normal queue without taking from it."""

import threading
import time
import uuid

import pytest
import redis
from rq.exceptions import DequeueTimeout

from common.models import Priority
from common.settings import Settings
from phase2_queue.jobs import task_queue, task_queues
from phase2_queue.taking import TakingQueue


@pytest.fixture
def connection(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def queues(redis_url: str, connection: redis.Redis) -> list[TakingQueue]:
    settings = Settings(redis_url=redis_url, queue_name=f"t{uuid.uuid4().hex[:8]}")
    return [TakingQueue.from_queue(q) for q in task_queues(settings, connection)]


def test_a_job_taken_while_waiting_is_in_the_intermediate_list(
    queues: list[TakingQueue], connection: redis.Redis
) -> None:
    normal = queues[1]
    timer = threading.Timer(0.3, lambda: normal.enqueue("common.tasks.echo", 1))
    timer.start()
    taken = TakingQueue.dequeue_any(queues, timeout=20, connection=connection)
    timer.join()
    assert taken is not None
    job, queue = taken
    assert queue.name == normal.name
    assert connection.lrange(normal.intermediate_queue_key, 0, -1) == [job.id.encode()]
    assert connection.llen(normal.key) == 0


def test_high_first_and_a_high_job_is_seen_while_waiting_on_normal(
    queues: list[TakingQueue], connection: redis.Redis
) -> None:
    high, normal, low = queues
    low.enqueue("common.tasks.echo", "low")
    high.enqueue("common.tasks.echo", "high")
    first = TakingQueue.dequeue_any(queues, timeout=5, connection=connection)
    assert first is not None and first[1].name == high.name
    TakingQueue.dequeue_any(queues, timeout=5, connection=connection)  # the low one
    threading.Timer(0.3, lambda: high.enqueue("common.tasks.echo", 2)).start()
    started = time.monotonic()
    taken = TakingQueue.dequeue_any(queues, timeout=20, connection=connection)
    assert taken is not None and taken[1].name == high.name
    assert time.monotonic() - started < 10  # within a look or two, not the timeout
    assert connection.llen(normal.key) == 0  # the wait took nothing from it


def test_nothing_to_take(queues: list[TakingQueue], connection: redis.Redis) -> None:
    """Burst (no timeout): None at once, as RQ's; else DequeueTimeout."""
    assert TakingQueue.dequeue_any(queues, timeout=None, connection=connection) is None
    with pytest.raises(DequeueTimeout):
        TakingQueue.dequeue_any(queues, timeout=1, connection=connection)


def test_a_gone_job_is_skipped_and_leaves_no_entry(
    redis_url: str, connection: redis.Redis
) -> None:
    settings = Settings(redis_url=redis_url, queue_name=f"g{uuid.uuid4().hex[:8]}")
    queue = TakingQueue.from_queue(task_queue(settings, connection, Priority.NORMAL))
    connection.rpush(queue.key, "gone")
    job = queue.enqueue("common.tasks.echo", 3)
    taken = TakingQueue.dequeue_any([queue], timeout=5, connection=connection)
    assert taken is not None and taken[0].id == job.id
    assert connection.lrange(queue.intermediate_queue_key, 0, -1) == [job.id.encode()]
