"""Phase 3's job loop (phase3_production/jobloop.py): a job in two round trips,
its success written by a script that replays RQ's writes and reported in the
round trip that takes the next job. What it leaves in Redis must be what phase
2's plain RQ worker leaves, for `rq` tools, rq-dashboard and the API to read."""

import threading
import time
import uuid
from typing import Any

import pytest
import redis
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.serializers import JSONSerializer

from common.settings import Settings
from phase2_queue.jobs import TaskJob, task_queue, task_queues
from phase2_queue.worker import TaskWorker
from phase3_production.jobloop import FastQueue, Outbox, wake_key
from phase3_production.worker import OUTCOMES_KEY, FastWorker

# Fields that differ between any two runs: moments, names, ids.
VARYING = {
    "created_at",
    "enqueued_at",
    "started_at",
    "ended_at",
    "last_heartbeat",
    "origin",
    "worker_name",
    "reporting",
    "description",
}


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, queue_name=f"j{uuid.uuid4().hex[:8]}")


def _queue(name: str, connection: redis.Redis) -> Queue:
    return Queue(
        name, connection=connection, serializer=JSONSerializer, job_class=TaskJob
    )


def _run(worker_class: type[TaskWorker], queues: list[Queue], jobs: int) -> Any:
    worker = worker_class(
        queues,
        connection=queues[0].connection,
        serializer=JSONSerializer,
        job_class=TaskJob,
        worker_ttl=20,
    )
    worker.work(burst=True, max_jobs=jobs, logging_level="WARNING")
    return worker


def _left(connection: redis.Redis, queue: Queue, job_id: str) -> dict[str, Any]:
    """What a finished job leaves: its hash (stable fields), its result's fields,
    where it is registered, what is left of its run."""
    fields = {k.decode(): v for k, v in connection.hgetall(f"rq:job:{job_id}").items()}
    results = connection.xrange(f"rq:results:{job_id}")
    assert len(results) == 1
    result = {k.decode(): v for k, v in results[0][1].items()}
    return {
        "fields": sorted(fields),
        "values": {k: v for k, v in fields.items() if k not in VARYING},
        "result fields": sorted(result),
        "result": {k: result[k] for k in ("type", "return_value")},
        "finished": queue.finished_job_registry.get_job_ids() == [job_id],
        "started": queue.started_job_registry.get_job_ids(),
        "queued": queue.get_job_ids(),
        "intermediate": connection.lrange(queue.intermediate_queue_key, 0, -1),
        "executions": connection.keys(f"rq:execution*:{job_id}*"),
        "job ttl": connection.ttl(f"rq:job:{job_id}") > 0,
    }


@pytest.mark.parametrize("result_ttl", [600, None])
def test_a_success_leaves_what_phase_2s_plain_worker_leaves(
    settings: Settings, result_ttl: int | None
) -> None:
    connection = redis.Redis.from_url(str(settings.redis_url))
    left = []
    for worker_class in (TaskWorker, FastWorker):
        queue = _queue(f"{settings.queue_name}-{worker_class.__name__}", connection)
        job = queue.enqueue(
            "common.tasks.echo", kwargs={"value": [1, "a"]}, result_ttl=result_ttl
        )
        worker = _run(worker_class, [queue], 1)
        left.append(_left(connection, queue, job.id))
        # The worker's own counts, as RQ keeps them (`rq info`, the dashboard).
        counts = connection.hmget(
            worker.key, ["successful_job_count", "failed_job_count", "state"]
        )
        assert counts[0] == b"1" and counts[1] is None
        assert float(connection.hget(worker.key, "total_working_time") or -1) >= 0
    assert left[0] == left[1]
    assert left[1]["finished"] and not left[1]["started"]
    assert not left[1]["intermediate"] and not left[1]["executions"]


def test_three_queues_are_taken_high_first_and_every_job_is_counted(
    settings: Settings,
) -> None:
    connection = redis.Redis.from_url(str(settings.redis_url))
    queues = task_queues(settings, connection)
    high, normal, low = queues
    ids = {}
    for name, queue in (("low", low), ("normal", normal), ("high", high)):
        ids[name] = [
            queue.enqueue("common.tasks.echo", kwargs={"value": i}).id for i in range(3)
        ]
    before = connection.hget(OUTCOMES_KEY, "succeeded:echo") or b"0"
    _run(FastWorker, queues, 9)
    started = {
        name: [
            Job.fetch(i, connection=connection, serializer=JSONSerializer).started_at
            for i in group
        ]
        for name, group in ids.items()
    }
    assert max(started["high"]) < min(started["normal"])  # type: ignore[type-var]
    assert max(started["normal"]) < min(started["low"])  # type: ignore[type-var]
    after = connection.hget(OUTCOMES_KEY, "succeeded:echo") or b"0"
    assert int(after) - int(before) == 9
    for queue in queues:
        assert queue.finished_job_registry.count == 3
        assert connection.llen(queue.intermediate_queue_key) == 0


def test_a_jobs_dependents_are_enqueued_when_it_succeeds(settings: Settings) -> None:
    """A job with dependents (another client's: ours have none) takes RQ's own
    path, which enqueues them."""
    connection = redis.Redis.from_url(str(settings.redis_url))
    queue = task_queue(settings, connection)
    first = queue.enqueue("common.tasks.echo", kwargs={"value": 1})
    then = queue.enqueue("common.tasks.echo", kwargs={"value": 2}, depends_on=first)
    _run(FastWorker, [queue], 2)
    assert first.get_status(refresh=True) == "finished"
    assert then.get_status(refresh=True) == "finished"
    assert then.return_value() == 2


def test_a_success_canceled_before_it_is_reported_stays_canceled(
    settings: Settings,
) -> None:
    """The claim runs when the success is written: a cancel that lands after the
    task returned but before the report (the next take) wins, as in phase 2."""
    connection = redis.Redis.from_url(str(settings.redis_url))
    queue = task_queue(settings, connection)
    job = queue.enqueue("common.tasks.echo", kwargs={"value": 1})
    worker = FastWorker(
        [queue], connection=connection, serializer=JSONSerializer, job_class=TaskJob
    )
    reported = worker._outbox.run

    def cancel_first(*args: Any, **kwargs: Any) -> list[Any]:
        if worker._outbox.pending is not None:
            connection.zadd(queue.canceled_job_registry.key, {job.id: 1})
        return reported(*args, **kwargs)

    worker._outbox.run = cancel_first  # type: ignore[method-assign]
    worker.work(burst=True, max_jobs=1, logging_level="WARNING")
    assert job.get_status(refresh=True) == "canceled"
    assert connection.xlen(f"rq:results:{job.id}") == 0
    assert queue.started_job_registry.get_job_ids() == []


def test_a_report_that_fails_is_sent_again_with_the_next_take(
    settings: Settings,
) -> None:
    """Redis gone at the report: RQ's dequeue tries again, and the success goes
    with that try (written once), not dropped for recovery to run the job again."""
    connection = redis.Redis.from_url(str(settings.redis_url))
    queue = task_queue(settings, connection)
    jobs = [queue.enqueue("common.tasks.echo", kwargs={"value": i}) for i in (1, 2)]
    worker = FastWorker(
        [queue], connection=connection, serializer=JSONSerializer, job_class=TaskJob
    )
    worker.max_connection_wait_time = 0.1
    reported = worker._outbox.run
    failed = []

    def fail_once(*args: Any, **kwargs: Any) -> list[Any]:
        if worker._outbox.pending is not None and not failed:
            failed.append(True)
            raise redis.ConnectionError("gone for a moment")
        return reported(*args, **kwargs)

    worker._outbox.run = fail_once  # type: ignore[method-assign]
    worker.work(burst=True, max_jobs=2, logging_level="WARNING")
    assert failed
    for job in jobs:
        assert job.get_status(refresh=True) == "finished"
        assert connection.xlen(f"rq:results:{job.id}") == 1
        assert connection.hget(job.key, "attempts") == b"1"  # run once
    assert queue.started_job_registry.get_job_ids() == []
    assert queue.finished_job_registry.count == 2


def test_an_idle_worker_takes_a_job_into_the_intermediate_list(
    settings: Settings,
) -> None:
    """Woken by phase 3's enqueue, the idle take moves the id to RQ's
    intermediate list, atomically: never off every list before its start (RQ's
    BLPOP on three queues is; a kill or a failover there strands the job)."""
    connection = redis.Redis.from_url(str(settings.redis_url))
    queues = [FastQueue.of(q, Outbox()) for q in task_queues(settings, connection)]
    normal = queues[1]
    job = Job.create(
        "common.tasks.echo", connection=connection, serializer=JSONSerializer
    )
    job.save()

    def push_and_wake() -> None:
        time.sleep(0.3)  # the worker is blocked by then
        with connection.pipeline() as pipe:
            pipe.rpush(normal.key, job.id)
            pipe.xadd(wake_key(normal.name), {"n": 1}, maxlen=1)
            pipe.execute()

    pusher = threading.Thread(target=push_and_wake)
    pusher.start()
    taken = FastQueue.dequeue_any(queues, timeout=20, connection=connection)
    pusher.join()
    assert taken is not None
    assert taken[0].id == job.id and taken[1].name == normal.name
    assert connection.lrange(normal.intermediate_queue_key, 0, -1) == [job.id.encode()]
    assert connection.llen(normal.key) == 0


def test_an_idle_worker_takes_a_job_pushed_without_a_wake(settings: Settings) -> None:
    """A stock RQ enqueue wakes no one: the idle worker finds the job on its next
    look (WAKE_POLL_SECONDS), well within its dequeue timeout."""
    connection = redis.Redis.from_url(str(settings.redis_url))
    queues = [FastQueue.of(q, Outbox()) for q in task_queues(settings, connection)]
    threading.Timer(0.3, lambda: queues[2].enqueue("common.tasks.echo", 1)).start()
    taken = FastQueue.dequeue_any(queues, timeout=20, connection=connection)
    assert taken is not None and taken[1].name == queues[2].name


def test_an_idle_take_with_nothing_to_take(settings: Settings) -> None:
    """Burst (no timeout): None at once, as RQ's; else DequeueTimeout when the
    timeout passes, which RQ's worker loop expects."""
    connection = redis.Redis.from_url(str(settings.redis_url))
    queues = [FastQueue.of(q, Outbox()) for q in task_queues(settings, connection)]
    assert FastQueue.dequeue_any(queues, timeout=None, connection=connection) is None
    with pytest.raises(DequeueTimeout):
        FastQueue.dequeue_any(queues, timeout=1, connection=connection)
