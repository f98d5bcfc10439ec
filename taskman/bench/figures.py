"""``taskman bench``: every phase as real processes, measured in one run against
baselines run in that same run, so each figure is a ratio that holds on any machine.
"""

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from rich.console import Console
from rich.progress import Progress
from rq import Queue
from rq.serializers import JSONSerializer

from taskman.phases import PHASES, queued
from taskman.processes import (
    Process,
    start,
    start_api,
    stop,
    taskman_command,
    wait_healthy,
)
from taskman.redis_server import EmbeddedRedis

console = Console(stderr=True)
# Phase 3 is measured with limits no load generator reaches: the bench measures the
# cost of checking a limit, not of being refused.
UNLIMITED = {
    "TASKMAN_RATE_LIMIT_SUBMIT": "1000000/second",
    "TASKMAN_RATE_LIMIT_READ": "1000000/second",
}
ECHO = {"type": "echo", "payload": {"value": 1}}


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    tool: str


def serve(
    module: str, env: dict[str, str] | None = None, port: int | None = None
) -> tuple[Process, str]:
    """``module``'s app under uvicorn, up and healthy; the process and its URL."""
    process, url = start_api(module, {**os.environ, **(env or {})}, port=port)
    wait_healthy(url, process)
    return process, url


@contextmanager
def service(module: str, env: dict[str, str] | None = None) -> Iterator[str]:
    process, url = serve(module, env)
    try:
        yield url
    finally:
        stop(process)


@contextmanager
def workers(count: int, env: dict[str, str], phase: int) -> Iterator[None]:
    processes = [_worker(env, phase) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            stop(process, kill=True)


def _worker(env: dict[str, str], phase: int | None, burst: bool = False) -> Process:
    """``taskman worker --phase PHASE``; with no phase, stock RQ's own."""
    if phase is None:
        # Stock RQ: its own CLI, SimpleWorker, the same JSON serializer.
        command = [
            str(Path(sys.executable).parent / "rq"),
            "worker",
            "-w",
            "rq.worker.SimpleWorker",
            "--serializer",
            "rq.serializers.JSONSerializer",
            "--url",
            env["TASKMAN_REDIS_URL"],
            "--quiet",
            env["TASKMAN_QUEUE_NAME"],
        ]
    else:
        command = taskman_command("worker", "--phase", str(phase))
    if burst:
        command.append("--burst")
    return start(command, env={**os.environ, **env})


def load(
    url: str, seconds: float, connections: int = 32, body: dict[str, Any] | None = None
) -> Load:
    """Requests/s and latency percentiles under load, from wrk where installed."""
    if shutil.which("wrk"):
        return _wrk(url, seconds, connections, body)
    return _python_load(url, seconds, connections, body)


def _wrk(
    url: str, seconds: float, connections: int, body: dict[str, Any] | None
) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if body is not None:
            script.write(
                'wrk.method = "POST"\n'
                f"wrk.body = [[{json.dumps(body)}]]\n"
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out:
        raise RuntimeError(f"errors under load:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    return Load(rps, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"), "wrk")


def _wrk_ms(out: str, percentile: str) -> float:
    value, unit = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _python_load(
    url: str, seconds: float, connections: int, body: dict[str, Any] | None
) -> Load:
    import asyncio

    latencies: list[float] = []

    async def one_connection(client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            if body is None:
                response = await client.get(url)
            else:
                response = await client.post(url, json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async def main() -> float:
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            started = time.monotonic()
            deadline = started + seconds
            await asyncio.gather(
                *(one_connection(client, deadline) for _ in range(connections))
            )
            return time.monotonic() - started

    elapsed = asyncio.run(main())
    p50, p99 = _percentiles(latencies)
    return Load(len(latencies) / elapsed, p50, p99, "httpx (wrk not installed)")


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    if not ordered:
        return 0.0, 0.0

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return pick(0.5), pick(0.99)


def finished_task(url: str) -> str:
    with httpx.Client(base_url=url, timeout=10) as client:
        task_id: str = client.post("/tasks", json=ECHO).json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"/tasks/{task_id}").json()["status"] != "succeeded":
            if time.monotonic() > deadline:
                raise TimeoutError("echo task never finished")
            time.sleep(0.01)
    return task_id


def echo_latency(url: str, count: int) -> tuple[float, float]:
    """Submit -> succeeded, from the task's own timestamps (server clock)."""
    spans = []
    with httpx.Client(base_url=url, timeout=10) as client:
        ids = []
        for _ in range(count):
            ids.append(client.post("/tasks", json=ECHO).json()["id"])
            time.sleep(0.005)  # one at a time: latency, not throughput
        for task_id in ids:
            deadline = time.monotonic() + 30
            while (task := client.get(f"/tasks/{task_id}").json())[
                "status"
            ] != "succeeded":
                if time.monotonic() > deadline:
                    raise TimeoutError(task)
                time.sleep(0.01)
            created = datetime.fromisoformat(task["created_at"])
            spans.append(
                (datetime.fromisoformat(task["finished_at"]) - created).total_seconds()
            )
    return _percentiles(spans)


def health_latency(url: str, count: int) -> tuple[float, float]:
    times = []
    with httpx.Client(timeout=30) as client:
        for _ in range(count):
            started = time.perf_counter()
            client.get(f"{url}/health").raise_for_status()
            times.append(time.perf_counter() - started)
            time.sleep(0.005)
    return _percentiles(times)


def worker_rate(redis_url: str, jobs: int, processes: int, phase: int | None) -> float:
    """Jobs/s of a burst of echo jobs, first start to last end, from RQ's own
    stamps; by the workers of ``phase``, or by stock RQ's."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    connection = redis.Redis.from_url(redis_url)
    queue = Queue(name, connection=connection, serializer=JSONSerializer)
    queue.enqueue_many(
        [
            Queue.prepare_data(
                "common.tasks.echo", kwargs={"value": None}, result_ttl=600
            )
            for _ in range(jobs)
        ]
    )
    # Both quiet: a log line per job costs as much as a Redis round trip.
    env = {
        "TASKMAN_REDIS_URL": redis_url,
        "TASKMAN_QUEUE_NAME": name,
        "TASKMAN_LOG_LEVEL": "WARNING",
    }
    burst = [_worker(env, phase, burst=True) for _ in range(processes)]
    for process in burst:
        process.wait(timeout=600)
    keys = [f"rq:job:{job_id}" for job_id in queue.finished_job_registry.get_job_ids()]
    with connection.pipeline() as pipe:
        for key in keys:
            pipe.hmget(key, ["started_at", "ended_at"])
        stamps = pipe.execute()
    if len(stamps) != jobs:
        raise RuntimeError(f"{jobs - len(stamps)} jobs did not finish")
    starts = [datetime.fromisoformat(s.decode()) for s, _ in stamps]
    ends = [datetime.fromisoformat(e.decode()) for _, e in stamps]
    connection.close()
    return jobs / (max(ends) - min(starts)).total_seconds()


FIGURES = ("http", "durability", "workers", "loop")


def run(
    phases: list[int],
    seconds: float,
    jobs: int,
    out_dir: Path,
    figures: Sequence[str] = FIGURES,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "seconds": seconds,
    }
    http, durable = "http" in figures, "durability" in figures
    queue_phases = [p for p in phases if queued(p)]
    measure_workers = "workers" in figures and bool(queue_phases)
    measure_loop = "loop" in figures and 1 in phases
    steps = http + len(phases) * (http + durable) + measure_workers + measure_loop
    with (
        Progress(*Progress.get_default_columns(), console=console) as progress,
        tempfile.TemporaryDirectory() as data,
        EmbeddedRedis(Path(data)) as redis_url,
    ):
        bar = progress.add_task("bench", total=steps)

        def step(text: str) -> None:
            progress.update(bar, description=text)

        if http:
            step("bare FastAPI (baseline)")
            with service("taskman.baseline") as url:
                results["baseline_post"] = asdict(
                    load(f"{url}/tasks", seconds, body=ECHO)
                )
                results["baseline_get"] = asdict(
                    load(f"{url}/tasks/{'0' * 32}", seconds)
                )
            progress.advance(bar)
        for phase in phases:
            results[f"phase{phase}"] = {}
            if not http:
                continue
            step(f"phase {phase}: POST, GET, echo latency")
            env = {
                "TASKMAN_REDIS_URL": redis_url,
                "TASKMAN_MAX_QUEUED": "1000000",
                "TASKMAN_QUEUE_NAME": f"bench-phase{phase}",
                **UNLIMITED,
            }
            with service(PHASES[phase], env) as url:
                post = load(f"{url}/tasks", seconds, body=ECHO)
                if queued(phase):
                    redis.Redis.from_url(redis_url).delete(
                        f"rq:queue:bench-phase{phase}"
                    )
                with workers(1 if queued(phase) else 0, env, phase):
                    task_id = finished_task(url)
                    echo = echo_latency(url, max(50, jobs // 10))
                get = load(f"{url}/tasks/{task_id}", seconds)
            results[f"phase{phase}"] = {
                "post": asdict(post),
                "get": asdict(get),
                "echo_p50_ms": echo[0],
                "echo_p99_ms": echo[1],
            }
            progress.advance(bar)
        for phase in phases if durable else []:
            step(f"phase {phase}: durability (kill -9 mid-run)")
            results[f"phase{phase}"]["durability"] = durability(phase, Path(data))
            progress.advance(bar)
        if measure_workers:
            # Ours: the worker of the latest phase measured.
            ours = results["workers_phase"] = max(queue_phases)
            step("workers: stock RQ SimpleWorker vs ours, 1 and 2 processes")
            results["workers"] = {
                f"{kind}_{n}": round(worker_rate(redis_url, jobs, n, phase), 1)
                for kind, phase in (("stock", None), ("taskman", ours))
                for n in (1, 2)
            }
            progress.advance(bar)
        if measure_loop:
            step("phase 1: /health while the pool is busy")
            results["loop"] = loop_figures(seconds)
            progress.advance(bar)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{results['date'][:19].replace(':', '')}.json"
    path.write_text(json.dumps(results, indent=2))
    results["json"] = str(path)
    return results


def durability(phase: int, data: Path, count: int = 200) -> dict[str, int]:
    """Submit ``count`` short tasks, SIGKILL the API (and a worker) mid-run,
    start them again, and count the tasks that got a 202 but are gone."""
    env = {
        "TASKMAN_IO_CONCURRENCY": "4",
        "TASKMAN_JOB_HEARTBEAT_SECONDS": "4",
        "TASKMAN_RETRY_BACKOFF": "0",
        **UNLIMITED,
    }
    body = {"type": "sleep", "payload": {"seconds": 0.02}}
    with contextlib.ExitStack() as stack:
        if queued(phase):
            store = EmbeddedRedis(data / f"durability{phase}")
            env["TASKMAN_REDIS_URL"] = stack.enter_context(store)
            env["TASKMAN_QUEUE_NAME"] = "durability"
        api, url = serve(PHASES[phase], env)
        port = int(url.rsplit(":", 1)[1])
        worker = _worker(env, phase) if queued(phase) else None
        with httpx.Client(base_url=url, timeout=10) as client:
            ids = [client.post("/tasks", json=body).json()["id"] for _ in range(count)]
        time.sleep(0.2)  # some ran, most wait
        stop(api, kill=True)
        if worker is not None:
            stop(worker, kill=True)
            time.sleep(1.1)  # what got a 202 is fsynced to the AOF within a second
        api, url = serve(PHASES[phase], env, port=port)
        stack.callback(stop, api)
        if queued(phase):
            stack.enter_context(workers(1, env, phase))
        lost = 0
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 60
            for task_id in ids:
                while True:
                    response = client.get(f"/tasks/{task_id}")
                    if response.status_code == 404:
                        lost += 1
                        break
                    if response.json()["status"] in ("succeeded", "failed", "canceled"):
                        break
                    if time.monotonic() > deadline:
                        lost += 1  # stuck counts as lost
                        break
                    time.sleep(0.02)
    return {"submitted": count, "lost": lost}


def loop_figures(seconds: float) -> dict[str, Any]:
    """/health p50/p99: idle; pool saturated; pool as large as the machine; naive."""
    cores = os.cpu_count() or 2
    variants = {
        "default pool": ("phase1_inprocess", {}),
        f"pool of {cores} (one per core)": (
            "phase1_inprocess",
            {"TASKMAN_CPU_WORKERS": str(cores)},
        ),
        "naive (CPU work on the loop)": ("taskman.naive", {}),
    }
    figures: dict[str, Any] = {}
    count = max(30, int(seconds * 20))
    for label, (module, env) in variants.items():
        with service(module, env) as url:
            if not figures:
                figures["idle"] = health_latency(url, count)
            busy = {"type": "hash", "payload": {"data": "x", "iterations": 2_000_000}}
            with httpx.Client(base_url=url, timeout=60) as client:
                for _ in range(cores * 4):
                    client.post("/tasks", json=busy)
            time.sleep(0.3)
            figures[label] = health_latency(url, count)
    return figures


def table(results: dict[str, Any]) -> str:
    def ratio(value: float, base: float) -> str:
        return f"{value / base:.0%}" if base else "-"

    lines = [f"Run {results['date']} on {results['machine']}."]
    measured = [
        k for k in ("phase1", "phase2", "phase3") if "post" in results.get(k, {})
    ]
    if "baseline_post" in results:
        bp, bg = results["baseline_post"], results["baseline_get"]
        lines += [
            f"HTTP load: {bp['tool']}, {results['seconds']} s per figure.",
            "",
            "| | POST /tasks req/s | vs bare | p50 / p99 ms | GET /tasks/{id} req/s | vs bare | echo submit→done p50 / p99 ms |",
            "|---|---|---|---|---|---|---|",
            f"| bare FastAPI | {bp['rps']:.0f} | 100% | {bp['p50_ms']} / {bp['p99_ms']} | {bg['rps']:.0f} | 100% | - |",
        ]
        for key in measured:
            r = results[key]
            lines.append(
                f"| {key} | {r['post']['rps']:.0f} | {ratio(r['post']['rps'], bp['rps'])} | "
                f"{r['post']['p50_ms']} / {r['post']['p99_ms']} | {r['get']['rps']:.0f} | "
                f"{ratio(r['get']['rps'], bg['rps'])} | {r['echo_p50_ms']} / {r['echo_p99_ms']} |"
            )
    durable = [
        k for k in ("phase1", "phase2", "phase3") if "durability" in results.get(k, {})
    ]
    if durable:
        lines += [
            "",
            "| kill -9 mid-run, then restart | tasks accepted | lost |",
            "|---|---|---|",
        ]
        for key in durable:
            d = results[key]["durability"]
            lines.append(f"| {key} | {d['submitted']} | {d['lost']} |")
    if "phase2" in measured and "phase3" in measured:
        p2, p3 = results["phase2"], results["phase3"]
        lines += [
            "",
            f"Phase 3 vs phase 2: POST {ratio(p3['post']['rps'], p2['post']['rps'])}, "
            f"GET {ratio(p3['get']['rps'], p2['get']['rps'])} (phase 3 GET is served by its cache).",
        ]
    if "workers" in results:
        w = results["workers"]
        lines += [
            "",
            "| worker on echo, jobs/s | 1 process | 2 processes |",
            "|---|---|---|",
            f"| stock `rq worker` (SimpleWorker) | {w['stock_1']} | {w['stock_2']} |",
            f"| taskman worker --phase {results.get('workers_phase', 2)} | {w['taskman_1']} ({ratio(w['taskman_1'], w['stock_1'])}) | "
            f"{w['taskman_2']} ({ratio(w['taskman_2'], w['stock_2'])}) |",
        ]
    if "loop" in results:
        lines += [
            "",
            "| phase 1 /health while hashing | p50 ms | p99 ms |",
            "|---|---|---|",
        ]
        for label, (p50, p99) in results["loop"].items():
            lines.append(f"| {label} | {p50} | {p99} |")
    return "\n".join(lines)
