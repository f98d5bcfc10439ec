"""Phase 2: ``GET /tasks``, newest first, from an index of our own.

RQ has no list of every job, and its registries (started, finished, failed,
canceled, scheduled) are sorted sets scored by expiry or due time, not by
creation, and a queued job is in none of them: merging them newest first would
read every one of them whole. So the enqueue also adds the task's position
(common/listing.py: creation time, then id) to one sorted set, every score 0, in
the same transaction as the job (backend.py); a page is one ZREVRANGEBYLEX from
the cursor, then one pipeline of the jobs it names: at most ``query.budget`` of
them, whatever the filter, never a scan. A status filter is applied to the jobs
read, not by reading RQ's registries: a registry's members would still have to
be read and ordered, and the queued and retrying tasks have none.

Entries outlive their jobs (RQ expires a finished job after its result TTL):
a page that meets one whose job is gone removes it (ZREM), so the index shrinks
as it is read.
"""

from typing import Any

import redis
from rq.results import Result
from rq.serializers import JSONSerializer

from common.listing import GONE, Missing, TaskQuery, page_of
from common.models import Task, TaskPage
from phase2_queue.jobs import TaskJob
from phase2_queue.reading import UNREADABLE, end_registry, not_a_task, to_task


def read_page(connection: redis.Redis, index: str, query: TaskQuery) -> TaskPage:
    """One page: the index from the cursor, then the jobs and their latest
    results in one round trip (three round trips in all, four with a clean-up)."""
    start = f"({query.after}" if query.after else "+"
    found: Any = connection.zrevrangebylex(index, start, "-", 0, query.budget)
    members = [member.decode() for member in found]
    tasks = read_tasks(connection, [member.partition(":")[2] for member in members])
    page, gone = page_of(query, members, tasks)
    if gone:
        connection.zrem(index, *gone)
    return page


def read_tasks(
    connection: redis.Redis, task_ids: list[str]
) -> list[Task | Missing | None]:
    """Each task, GONE, or None (a job that is not a task we can read): the
    job hashes and latest results in one pipeline. What ``Job.fetch_many`` does,
    plus each job's ``latest_result()`` in the same round trip, and a job that
    cannot be read (another client's) skipped rather than failing the page."""
    with connection.pipeline(transaction=False) as pipe:
        for task_id in task_ids:
            pipe.hgetall(TaskJob.key_for(task_id))
            pipe.xrevrange(Result.get_key(task_id), "+", "-", count=1)  # type: ignore[no-untyped-call]
        replies = pipe.execute()
    tasks: list[Task | Missing | None] = []
    late: list[tuple[int, TaskJob, Result | None, str]] = []
    for number, task_id in enumerate(task_ids):
        raw, entries = replies[2 * number], replies[2 * number + 1]
        if not raw:
            tasks.append(GONE)
            continue
        try:
            job = TaskJob(task_id, connection=connection, serializer=JSONSerializer)
            job.restore(raw)
            latest = None
            if entries:
                entry, payload = entries[0]
                latest = Result.restore(
                    task_id,
                    entry.decode(),
                    payload,
                    connection=connection,
                    serializer=JSONSerializer,
                )
            registry = end_registry(job, latest)
            if registry is not None:
                late.append((number, job, latest, registry))  # dated below
            tasks.append(to_task(job, latest))
        except UNREADABLE as error:
            tasks.append(not_a_task(task_id, error))
    if late:
        # A job canceled by plain RQ is dated by its registry score, as GET does.
        with connection.pipeline(transaction=False) as pipe:
            for _, job, _, registry in late:
                pipe.zscore(registry, job.id)
            scores = pipe.execute()
        for (number, job, latest, _), score in zip(late, scores, strict=True):
            tasks[number] = to_task(job, latest, score)
    return tasks
