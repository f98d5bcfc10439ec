"""``taskman bench --rtt``: worker jobs/s and POST latency against the round-trip
time to Redis, where round trips per job, not the job, set a worker's pace.

Redis, the APIs, the workers and the client each on a host of their own (network
namespaces, taskman/netns.py); the delay sits in front of Redis (a delay line,
taskman/delayline.py: this kernel has no netem), all of it on the reply side. Each
row also gives the PING round trip measured from the workers' host, which is what
the delay line really added. Needs root.
"""

import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from taskman.bench.figures import ECHO, UNLIMITED, _worker  # how it starts workers
from taskman.bench.load import percentiles
from taskman.delayline import set_delay
from taskman.netns import Network
from taskman.phases import PHASES
from taskman.processes import stop

RTTS = (0.0, 1.0, 5.0)
DELAY_PORT = 6380
# Stock RQ's own worker (SimpleWorker), then each queued phase's `taskman worker`.
KINDS: tuple[tuple[str, int | None], ...] = (
    ("stock", None),
    ("phase2", 2),
    ("phase3", 3),
)
API_PHASES = (2, 3)


def run_rtt(
    out_dir: Path,
    rtts: Sequence[float] = RTTS,
    jobs: int = 300,
    posts: int = 200,
) -> dict[str, Any]:
    """One row per delay (plus one with no delay line at all); the results, also
    written as JSON to ``out_dir``."""
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "jobs": jobs,
        "posts": posts,
        "rows": [],
    }
    roles = ["redis", "api", "worker", "client"]
    with (
        tempfile.TemporaryDirectory() as data,
        Network(roles) as net,
        ExitStack() as stack,
    ):
        server = net.redis("redis", Path(data) / "redis")
        stack.callback(server.stop)
        direct = server.url
        address = net["redis"].address
        control = Path(data) / "delay.sock"
        line = net.start(
            "redis",
            [
                *(sys.executable, "-m", "taskman.delayline"),
                *(f"{address}:{DELAY_PORT}", f"{address}:6379"),
                *("--control", str(control)),
            ],
        )
        stack.callback(stop, line)
        delayed = f"redis://{address}:{DELAY_PORT}/0"
        set_delay(control, 0)  # waits until it is up
        apis = stack.enter_context(_apis(net, {"direct": direct, "delayed": delayed}))
        rows: list[tuple[str, float | None]] = [("0, no delay line", None)]
        rows += [(f"{ms:g}", ms) for ms in rtts]
        for label, delay in rows:
            if delay is not None:
                set_delay(control, delay)
            url = direct if delay is None else delayed
            count = max(10, round(jobs / (1 + (delay or 0))))
            row: dict[str, Any] = {"rtt_ms": label, "jobs": count}
            with net.inside("worker"):
                row["ping_ms"] = _ping_ms(url)
                for kind, phase in KINDS:
                    row[kind] = round(_worker_rate(url, count, phase), 1)
            with net.inside("client"):
                for phase in API_PHASES:
                    api = apis["direct" if delay is None else "delayed", phase]
                    p50, p99 = _post_latency(api, posts)
                    row[f"post_p50_ms_phase{phase}"] = p50
                    row[f"post_p99_ms_phase{phase}"] = p99
            results["rows"].append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-rtt-{results['date'][:19].replace(':', '')}.json"
    path.write_text(json.dumps(results, indent=2))
    results["json"] = str(path)
    return results


@contextmanager
def _apis(
    net: Network, redis_urls: dict[str, str]
) -> Iterator[dict[tuple[str, int], str]]:
    """An API per phase and per Redis URL, all on the API host; their URLs."""
    with ExitStack() as stack:
        started = {}
        for port, (key, phase) in enumerate(
            ((key, phase) for key in redis_urls for phase in API_PHASES), 8000
        ):
            env = {
                **os.environ,
                **UNLIMITED,
                "TASKMAN_REDIS_URL": redis_urls[key],
                "TASKMAN_QUEUE_NAME": f"rtt-api{phase}-{key}",
                "TASKMAN_MAX_QUEUED": "1000000",
            }
            process, url = net.api("api", PHASES[phase], env, port=port)
            stack.callback(stop, process)
            started[key, phase] = (process, url)
        for process, url in started.values():  # started together, waited for here
            net.wait_healthy("client", url, process)
        yield {key: url for key, (_, url) in started.items()}


def _worker_rate(redis_url: str, jobs: int, phase: int | None) -> float:
    """Jobs/s of one burst worker on ``jobs`` echo jobs, from the first one's start
    to the last one's end (RQ's own stamps), after a job that is not counted.

    That first job pays for stock RQ's import of the task module (0.4-0.6 s here;
    ``taskman worker`` imports it before it starts): a few dozen jobs at 5 ms
    would otherwise measure mostly the import.
    """
    name = f"rtt-{uuid.uuid4().hex[:8]}"
    connection = redis.Redis.from_url(redis_url)
    try:
        queue = Queue(name, connection=connection, serializer=JSONSerializer)
        echo = Queue.prepare_data("common.tasks.echo", kwargs={"value": None})
        counted = queue.enqueue_many([echo] * (jobs + 1))[1:]  # the first: warm-up
        env = {
            "TASKMAN_REDIS_URL": redis_url,
            "TASKMAN_QUEUE_NAME": name,
            "TASKMAN_LOG_LEVEL": "WARNING",  # a log line per job costs a round trip
        }
        done = _worker(env, phase, burst=True).wait(timeout=600)
        with connection.pipeline() as pipe:
            for job in counted:
                pipe.hmget(job.key, ["status", "started_at", "ended_at"])
            stamps = pipe.execute()
    finally:
        connection.close()
    if done != 0 or any(status != b"finished" for status, _, _ in stamps):
        raise RuntimeError(f"the worker exited with {done} before every job ran")
    starts = [datetime.fromisoformat(s.decode()) for _, s, _ in stamps]
    ends = [datetime.fromisoformat(e.decode()) for _, _, e in stamps]
    return jobs / (max(ends) - min(starts)).total_seconds()


def _ping_ms(url: str, count: int = 100) -> float:
    client = redis.Redis.from_url(url)
    try:
        client.ping()
        times = []
        for _ in range(count):
            started = time.perf_counter()
            client.ping()
            times.append(time.perf_counter() - started)
    finally:
        client.close()
    return round(statistics.median(times) * 1000, 2)


def _post_latency(url: str, count: int) -> tuple[float, float]:
    """POST /tasks one at a time: each one's latency, not a load's throughput."""
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/tasks", json=ECHO).raise_for_status()  # the connection
        for _ in range(count):
            started = time.perf_counter()
            client.post("/tasks", json=ECHO).raise_for_status()
            times.append(time.perf_counter() - started)
    return percentiles(times)


def rtt_table(results: dict[str, Any]) -> str:
    """The rows as the Markdown table docs/scaling.md quotes."""
    lines = [
        f"Run {results['date']} on {results['machine']}; one worker process, "
        f"echo jobs; {results['posts']} POSTs one at a time.",
        "",
        "| RTT to Redis, ms | PING p50 ms | stock `rq worker` jobs/s "
        "| `taskman worker --phase 2` | `--phase 3` "
        "| POST p50 / p99 ms, phase 2 | phase 3 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['rtt_ms']} | {row['ping_ms']} | {row['stock']} "
            f"| {row['phase2']} | {row['phase3']} "
            f"| {row['post_p50_ms_phase2']} / {row['post_p99_ms_phase2']} "
            f"| {row['post_p50_ms_phase3']} / {row['post_p99_ms_phase3']} |"
        )
    return "\n".join(lines)
