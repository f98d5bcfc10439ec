"""taskman: serve a phase, run its workers, or talk to a running API."""

# A thin layer, like arq's cli.py: it builds Settings and hands over to uvicorn or
# RQ. It sits above the phases; nothing imports it.

import importlib
import json
import logging
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import uvicorn
from rich.console import Console

from common.settings import Settings
from taskman.http import uvicorn_options
from taskman.phases import LATEST, PHASES, queued
from taskman.processes import taskman_command
from taskman.redis_server import EmbeddedRedis
from taskman.supervisor import Supervisor

app = typer.Typer(no_args_is_help=True, help=__doc__, add_completion=False)
console = Console()

Phase = Annotated[int, typer.Option(min=1, max=3, help="Which phase to run.")]
Url = Annotated[str, typer.Option(envvar="TASKMAN_URL", help="The API to talk to.")]


def _module(phase: int) -> str:
    if phase not in PHASES:
        raise typer.BadParameter(
            f"phase {phase} is not built yet", param_hint="--phase"
        )
    return PHASES[phase]


@app.command()
def serve(
    phase: Phase = LATEST,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[
        int, typer.Option(min=0, help="RQ worker processes to start (phases 2-3).")
    ] = 2,
) -> None:
    """Serve a phase's API (OpenAPI docs at /docs); from phase 2 on, with workers."""
    module = _module(phase)
    _log_setup()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: with the default
    # action that would kill us before the ExitStack stops Redis and the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with ExitStack() as stack:
        if queued(phase):
            settings = Settings()
            if not settings.redis_url:
                redis_server = EmbeddedRedis(settings.data_dir / "redis")
                url = stack.enter_context(redis_server)
                os.environ["TASKMAN_REDIS_URL"] = url  # for the app and the workers
                logging.getLogger("taskman").info(
                    "embedded Redis at %s (data in %s)", url, redis_server.data_dir
                )
            if workers:
                stack.enter_context(_workers(phase, workers))
        uvicorn.run(
            f"{module}:create_app",
            factory=True,
            host=host,
            port=port,
            timeout_graceful_shutdown=30,
            **uvicorn_options(),  # the tools' servers run with the same
        )


@app.command()
def worker(
    phase: Phase = LATEST,
    burst: Annotated[bool, typer.Option(help="Quit when the queue is empty.")] = False,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Worker processes to run.")
    ] = 1,
) -> None:
    """Run RQ worker processes for a phase's queue (phases 2-3)."""
    if not queued(phase):
        raise typer.BadParameter("phase 1 runs its tasks in the API process")
    module = _module(phase)
    _log_setup()
    if concurrency > 1:
        # SIGTERM as Ctrl-C: stop the workers (warm) on the way out.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with _workers(phase, concurrency, burst) as supervisor:
            supervisor.wait()
        return
    # Each phase's own worker: phase 3's is the engine room's (fewer round trips).
    importlib.import_module(f"{module}.worker").run_worker(Settings(), burst=burst)


def _workers(phase: int, count: int, burst: bool = False) -> Supervisor:
    """``count`` ``taskman worker`` children, each started again if it dies.

    On exit, RQ's warm shutdown: each finishes its current task. A task still
    running after the grace period is killed; its job goes back to the queue.
    """
    args = ["worker", "--phase", str(phase)] + (["--burst"] if burst else [])
    return Supervisor(taskman_command(*args), count, burst=burst, grace=10)


def _log_setup() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s:  [taskman] %(message)s"
    )


@app.command()
def submit(
    type: Annotated[  # noqa: A002
        str, typer.Argument(help="echo, sleep, primes, hash, flaky or fail")
    ],
    payload: Annotated[str, typer.Option(help="The payload, as JSON.")] = "{}",
    max_retries: Annotated[int | None, typer.Option()] = None,
    wait: Annotated[bool, typer.Option(help="Poll until the task finishes.")] = False,
    url: Url = "http://127.0.0.1:8000",
) -> None:
    """Submit a task and print it."""
    try:
        body: dict[str, Any] = {"type": type, "payload": json.loads(payload)}
    except json.JSONDecodeError as error:
        raise typer.BadParameter(f"not JSON: {error}", param_hint="--payload") from None
    if max_retries is not None:
        body["max_retries"] = max_retries
    with httpx.Client(base_url=url, timeout=10) as client:
        task = _answer(client.post("/tasks", json=body))
        while wait and task["status"] not in ("succeeded", "failed", "canceled"):
            time.sleep(0.1)
            task = _answer(client.get(f"/tasks/{task['id']}"))
    console.print_json(data=task)


@app.command()
def status(task_id: str, url: Url = "http://127.0.0.1:8000") -> None:
    """Print a task."""
    with httpx.Client(base_url=url, timeout=10) as client:
        console.print_json(data=_answer(client.get(f"/tasks/{task_id}")))


def _answer(response: httpx.Response) -> Any:
    if response.is_error:
        console.print(f"[red]{response.status_code}[/red] {response.text}")
        raise typer.Exit(1)
    return response.json()


@app.command()
def bench(
    phases: Annotated[str, typer.Option(help="Comma-separated phases.")] = "1,2,3",
    seconds: Annotated[float, typer.Option(help="Seconds of load per figure.")] = 5,
    jobs: Annotated[int, typer.Option(help="Jobs per worker figure.")] = 2000,
    quick: Annotated[bool, typer.Option(help="Short run (under a minute).")] = False,
    out: Annotated[Path, typer.Option(help="Where the JSON goes.")] = Path(
        "bench-results"
    ),
    charts: Annotated[
        Path | None, typer.Option(help="Where PNG charts go (e.g. docs/img).")
    ] = None,
    figures: Annotated[
        str,
        typer.Option(help="Comma-separated: http, durability, workers, loop, peers."),
    ] = "http,durability,workers,loop",
    peers: Annotated[
        bool,
        typer.Option(
            help="Also FastAPI + stock RQ, Celery, arq, saq and taskiq "
            "(the `peers` extra), in the same run."
        ),
    ] = False,
    peers_python: Annotated[
        str,
        typer.Option(
            envvar="TASKMAN_PEERS_PYTHON",
            help="The Python that has the `peers` extra (default: this one).",
        ),
    ] = sys.executable,
) -> None:
    """Measure every phase against a bare FastAPI app and stock RQ, in one run."""
    from taskman.bench.runner import FIGURES, run
    from taskman.bench.table import table

    if quick:
        seconds, jobs = 1, 300
    chosen = [int(p) for p in phases.split(",") if p.strip()]
    for phase in chosen:
        _module(phase)
    wanted = [f.strip() for f in figures.split(",") if f.strip()]
    if unknown := set(wanted) - set(FIGURES):
        raise typer.BadParameter(
            f"unknown: {', '.join(sorted(unknown))}", param_hint="--figures"
        )
    if peers and "peers" not in wanted:
        wanted.append("peers")
    results = run(chosen, seconds, jobs, out, wanted, peers_python)
    print(table(results))
    console.print(f"[dim]JSON: {results['json']}[/dim]")
    if charts is not None:
        from taskman.charts import draw

        for path in draw(results, charts):
            console.print(f"[dim]chart: {path}[/dim]")


@app.command()
def chaos(
    tasks: Annotated[
        int, typer.Option("--tasks", "-n", help="Tasks to submit.")
    ] = 10_000,
    kills: Annotated[int, typer.Option(help="Worker SIGKILLs during the run.")] = 20,
    workers: Annotated[int, typer.Option(min=2, help="Worker processes.")] = 3,
    redis_grace: Annotated[
        float,
        typer.Option(help="Seconds between the last submission and the Redis kill."),
    ] = 1.5,
    seed: Annotated[int | None, typer.Option(help="Seed of the task mix.")] = None,
    settle: Annotated[
        float, typer.Option(help="Seconds after the last kill before 'stuck'.")
    ] = 120,
    keep: Annotated[bool, typer.Option(help="Keep the logs and ledger.")] = False,
) -> None:
    """Kill workers and Redis under load; check that no accepted task is lost or stuck."""
    from taskman.chaos import RECOVERY_TARGET, print_summary, run_chaos

    # SIGTERM as Ctrl-C: stop the API, the workers and Redis on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    result = run_chaos(
        tasks,
        kills,
        workers=workers,
        seed=seed,
        redis_grace=redis_grace,
        settle_timeout=settle,
        keep=keep,
        log=lambda line: console.print(f"[dim]{line}[/dim]"),
    )
    print_summary(result, console)
    recovery = result.recovery_seconds
    if not result.ok or recovery is None or recovery > RECOVERY_TARGET:
        raise typer.Exit(1)


@app.command()
def demo(
    phase: Annotated[
        int | None, typer.Option(min=1, max=3, help="Run this phase's steps only.")
    ] = None,
    pause: Annotated[
        bool, typer.Option(help="Wait for Enter between steps (on a terminal).")
    ] = False,
    fast: Annotated[
        bool, typer.Option(help="Short tasks and waits (for the tests).")
    ] = False,
) -> None:
    """A narrated live tour of the phases: real servers, workers, kills and requests."""
    from taskman.demo import run

    raise typer.Exit(run([phase] if phase else list(PHASES), pause=pause, fast=fast))
