"""One bench run: the baseline, then each figure asked for, against one Redis."""

import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.progress import Progress

from taskman.bench.features import batch_rate, wait_latency
from taskman.bench.figures import (
    ECHO,
    UNLIMITED,
    durability,
    echo_latency,
    finished_task,
    loop_figures,
    service,
    unfinished_task,
    worker_rate,
    workers,
)
from taskman.bench.load import load
from taskman.bench.peers.measure import measure_peers as measure_peers_figures
from taskman.bench.peers.registry import PEERS
from taskman.phases import PHASES, queued
from taskman.redis_server import EmbeddedRedis

console = Console(stderr=True)

FIGURES = ("http", "durability", "workers", "loop", "peers")


def run(
    phases: list[int],
    seconds: float,
    jobs: int,
    out_dir: Path,
    figures: Sequence[str] = FIGURES,
    peers_python: str = sys.executable,
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
    measure_peers = "peers" in figures
    steps = (
        http
        + len(phases) * (http + durable)
        + measure_workers
        + measure_loop
        + measure_peers * (len(PEERS) + 2)
    )
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
            with service("taskman.baseline") as (url, pid):
                results["baseline_post"] = asdict(
                    load(f"{url}/tasks", seconds, body=ECHO, pid=pid)
                )
                results["baseline_get"] = asdict(
                    load(f"{url}/tasks/{'0' * 32}", seconds, pid=pid)
                )
            progress.advance(bar)
        for phase in phases:
            results[f"phase{phase}"] = {}
            if not http:
                continue
            step(f"phase {phase}: POST, batch, GET, wait and echo latency")
            env = {
                "TASKMAN_REDIS_URL": redis_url,
                "TASKMAN_MAX_QUEUED": "1000000",
                "TASKMAN_QUEUE_NAME": f"bench-phase{phase}",
                **UNLIMITED,
            }
            with service(PHASES[phase], env) as (url, pid):
                post = load(f"{url}/tasks", seconds, body=ECHO, pid=pid)
                batch = batch_rate(url, seconds)
                if queued(phase):
                    redis.Redis.from_url(redis_url).delete(
                        f"rq:queue:bench-phase{phase}"
                    )
                with workers(1 if queued(phase) else 0, env, phase):
                    task_id = finished_task(url)
                    echo = echo_latency(url, max(50, jobs // 10))
                    waited = wait_latency(url, max(30, jobs // 20))
                get = load(f"{url}/tasks/{task_id}", seconds, pid=pid)
                pending = load(f"{url}/tasks/{unfinished_task(url)}", seconds, pid=pid)
            results[f"phase{phase}"] = {
                "post": asdict(post),
                "get": asdict(get),
                "get_unfinished": asdict(pending),
                "echo_p50_ms": echo[0],
                "echo_p99_ms": echo[1],
                "wait_p50_ms": waited[0],
                "wait_p99_ms": waited[1],
                "batch": batch,
            }
            progress.advance(bar)
        for phase in phases if durable else []:
            step(f"phase {phase}: durability (kill -9 mid-run)")
            results[f"phase{phase}"]["durability"] = durability(phase, Path(data))
            progress.advance(bar)
        if measure_workers:
            # Stock RQ's, then each queued phase's own: plain RQ (2), the engine
            # room's (3).
            step("workers: stock RQ SimpleWorker vs each phase's, 1 and 2 processes")
            kinds = [("stock", None)] + [(f"phase{p}", p) for p in queue_phases]
            results["workers"] = {
                f"{kind}_{n}": round(worker_rate(redis_url, jobs, n, phase), 1)
                for kind, phase in kinds
                for n in (1, 2)
            }
            progress.advance(bar)
        if measure_loop:
            step("phase 1: /health while the pool is busy")
            results["loop"] = loop_figures(seconds)
            progress.advance(bar)
        if measure_peers:

            def peer_step(text: str) -> None:
                step(text)
                progress.advance(bar)

            results["peers"] = measure_peers_figures(
                redis_url, seconds, jobs, peers_python, peer_step
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{results['date'][:19].replace(':', '')}.json"
    path.write_text(json.dumps(results, indent=2))
    results["json"] = str(path)
    return results
