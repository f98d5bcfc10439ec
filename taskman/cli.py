"""taskman: serve a phase, run its workers, or talk to a running API."""

# A thin layer, like arq's cli.py: it builds Settings and hands over to uvicorn or
# RQ. It sits above the phases; nothing imports it.

import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from rich.console import Console

from common.settings import Settings
from taskman.client import ClientError, TaskClient
from taskman.http import uvicorn_options
from taskman.phases import LATEST, PHASES, queued
from taskman.processes import taskman_command
from taskman.redis_server import EmbeddedRedis
from taskman.supervisor import Supervisor
from taskman.views import follow, task_table

app = typer.Typer(no_args_is_help=True, help=__doc__, add_completion=False)
console = Console()

Phase = Annotated[int, typer.Option(min=1, max=3, help="Which phase to run.")]
Url = Annotated[str, typer.Option(envvar="TASKMAN_URL", help="The API to talk to.")]
Timeout = Annotated[
    float, typer.Option(min=0.001, help="Seconds to wait for each answer.")
]
DEFAULT_URL = "http://127.0.0.1:8000"


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
            if not settings.redis_configured:  # a URL, or sentinels to ask
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
    priority: Annotated[
        str | None, typer.Option(help="high, normal (the default) or low.")
    ] = None,
    delay: Annotated[
        float | None, typer.Option(help="Seconds to wait before it may run.")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            help="Show its progress until it finishes; exit 1 if it failed or "
            "was canceled."
        ),
    ] = False,
    url: Url = DEFAULT_URL,
    timeout: Timeout = 10.0,
) -> None:
    """Submit a task and print it (with --wait: once it has finished)."""
    try:
        body: dict[str, Any] = {"type": type, "payload": json.loads(payload)}
    except json.JSONDecodeError as error:
        raise typer.BadParameter(f"not JSON: {error}", param_hint="--payload") from None
    options = {"max_retries": max_retries, "priority": priority, "delay_seconds": delay}
    body.update({name: value for name, value in options.items() if value is not None})
    with _client(url, timeout) as client:
        task = client.submit(body)
        if wait:
            task = follow(client, task["id"])
    _print_task(task, wait)


@app.command()
def status(task_id: str, url: Url = DEFAULT_URL, timeout: Timeout = 10.0) -> None:
    """Print a task."""
    with _client(url, timeout) as client:
        console.print_json(data=client.get(task_id))


@app.command("list")
def list_tasks(
    status: Annotated[
        str | None, typer.Option(help="Only tasks in this status, e.g. failed.")
    ] = None,
    type: Annotated[  # noqa: A002
        str | None, typer.Option(help="Only tasks of this type, e.g. primes.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=1000, help="Tasks per page (the API's limit).")
    ] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="Start at this page (a next_cursor).")
    ] = None,
    all_pages: Annotated[
        bool, typer.Option("--all", help="Follow next_cursor to the last page.")
    ] = False,
    url: Url = DEFAULT_URL,
    timeout: Timeout = 10.0,
) -> None:
    """List tasks, newest first, as a table."""
    with _client(url, timeout) as client:
        tasks, cursor = client.tasks(status, type, limit, cursor, all_pages)
    console.print(task_table(tasks))
    if cursor is not None:
        console.print(
            f"[dim]more: taskman list --cursor {cursor}[/dim]", soft_wrap=True
        )


@app.command()
def cancel(task_id: str, url: Url = DEFAULT_URL, timeout: Timeout = 10.0) -> None:
    """Cancel a scheduled, queued, running or retrying task; print it."""
    with _client(url, timeout) as client:
        console.print_json(data=client.cancel(task_id))


@app.command()
def watch(task_id: str, url: Url = DEFAULT_URL, timeout: Timeout = 10.0) -> None:
    """Follow a task to its end (a progress bar, from its event stream); exit 1 if
    it failed or was canceled."""
    with _client(url, timeout) as client:
        task = follow(client, task_id)
    _print_task(task, True)


def _print_task(task: dict[str, Any], finished: bool) -> None:
    console.print_json(data=task)
    if finished and task["status"] != "succeeded":
        raise typer.Exit(1)


@contextmanager
def _client(url: str, timeout: float) -> Iterator[TaskClient]:
    """A client of the API at ``url``; whatever goes wrong talking to it is one
    line on stderr and exit 2, never a traceback."""
    try:
        with TaskClient(url, timeout) as client:
            yield client
    except ClientError as error:
        typer.echo(f"taskman: {error}", err=True)
        raise typer.Exit(2) from None


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
    rtt: Annotated[
        bool,
        typer.Option(
            help="Instead: worker jobs/s and POST latency at 0, 1 and 5 ms of "
            "round trip to Redis, on hosts of their own (network namespaces; root)."
        ),
    ] = False,
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

    if rtt:
        from taskman.bench.rtt import rtt_table, run_rtt

        # Quick: one delay, a few jobs; for the tests.
        found = run_rtt(out, [5.0], jobs=30, posts=20) if quick else run_rtt(out)
        print(rtt_table(found))
        console.print(f"[dim]JSON: {found['json']}[/dim]")
        return
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
