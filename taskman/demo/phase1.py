"""Phase 1 of the tour: an in-process event bus, fast, and forgetful."""

import time
from datetime import datetime
from pathlib import Path

import httpx
from rich.markup import escape

from taskman.demo.features import features
from taskman.demo.narration import DemoError, Tour, Watched
from taskman.demo.servers import Processes, base_env, serve
from taskman.redis_server import free_port


def submit_mix(tour: Tour, client: httpx.Client) -> list[Watched]:
    """One task of each kind of work: none, waiting, and two that burn CPU."""
    pace = tour.pace
    return [
        tour.submit(client, "echo", {"value": "hello"}),
        tour.submit(client, "sleep", {"seconds": pace.sleep}),
        tour.submit(client, "primes", {"limit": pace.primes_limit}),
        tour.submit(
            client, "hash", {"data": "taskman", "iterations": pace.hash_iterations}
        ),
    ]


def phase1(tour: Tour, workdir: Path) -> None:
    pace = tour.pace
    tour.phase(
        1,
        "an in-process event bus",
        "POST /tasks records the task, puts its id on an asyncio queue and answers "
        "at once. Coroutines in the same process take ids off the queue and run "
        "them; CPU-heavy types go to a process pool so the API stays responsive.\n"
        "Simple and fast, but every task lives in the server's memory.",
    )
    shown = {
        "TASKMAN_IO_CONCURRENCY": "2",
        "TASKMAN_SHUTDOWN_TIMEOUT": "2",
        "TASKMAN_RETRY_BACKOFF": pace.retry_backoff,
    }
    env = {**base_env(), **shown, "TASKMAN_DATA_DIR": str(workdir / "phase1")}
    port = free_port()
    with Processes(tour.console, workdir / "logs" / "phase1") as procs:
        tour.step(
            "Start the server",
            "One process: the API and the task runners together.",
            "TASKMAN_IO_CONCURRENCY=2 (default 64) lets two sleeps run at once, so a "
            "queue forms with a handful of tasks in step 1.5; "
            "TASKMAN_SHUTDOWN_TIMEOUT=2 (default 10) gives running tasks 2 s to "
            "finish when the server is stopped.",
        )
        server = serve(tour, procs, "serve-1", 1, port, 0, env, shown)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            tour.call(client, "GET", "/health")
            tour.wait_for_enter()

            tour.step(
                "Submit a mix of tasks",
                "echo does no work, sleep waits, primes and hash burn CPU.",
            )
            mix = submit_mix(tour, client)
            tour.notice(
                "each POST answered 202 within milliseconds, before any work was "
                "done. Now we poll GET /tasks/{id} until all four have finished:"
            )
            tour.watch(client, mix)
            tour.notice(
                "the API kept answering our polls while the hash ran: CPU work "
                "runs in a pool process, not on the event loop."
            )
            tour.wait_for_enter()

            retries(tour, client)
            cancel(tour, client)
            features(tour, client)

            tour.step(
                "Stop the server while tasks are queued",
                "Six sleeps: two run, four wait in the server's memory.",
            )
            doomed = [
                tour.submit(
                    client, "sleep", {"seconds": pace.queued_sleep}, compact=True
                )
                for _ in range(6)
            ]
            time.sleep(0.3)
            tour.call(client, "GET", "/health")
            tour.say(
                "Now stop the server the polite way, with SIGTERM, as Ctrl-C or a "
                "deploy would:"
            )
            tour.say(f"[bold]$ kill -TERM {server.pid}[/bold]")
            started = time.monotonic()
            code = procs.stop(server)
            tour.say(
                f"[dim]It exited with code {code} after "
                f"{time.monotonic() - started:.1f} s. Its log says:[/dim]"
            )
            for line in procs.log(server).read_text(errors="replace").splitlines():
                if "lost" in line or "canceled mid-run" in line:
                    tour.say(f"  [red]{escape(line)}[/red]")
            tour.say("Start it again on the same port, and ask for the six tasks:")
            serve(tour, procs, "serve-1-again", 1, port, 0, env, shown)
            missing = 0
            for watched in doomed:
                response = tour.call(
                    client, "GET", f"/tasks/{watched.task['id']}", compact=True
                )
                missing += response.status_code == 404
            tour.key(
                f"Lost: {missing} of {len(doomed)} tasks answered 404 after the restart."
            )
            if missing != len(doomed):
                raise DemoError("phase 1 was expected to lose every task")
            tour.notice(
                "four never started, two were cut off mid-run. A kill -9 loses "
                "them the same way, without even the warning. Phase 2 keeps tasks "
                "outside the process: in Redis."
            )
            tour.wait_for_enter()


def retries(tour: Tour, client: httpx.Client) -> None:
    delays = [f"{float(d):g} s" for d in tour.pace.retry_backoff.split(",")]
    when = (
        "at once"
        if delays == ["0 s"]
        else "after " + ", ".join(delays[:-1]) + f", then {delays[-1]}"
    )
    tour.step(
        "Retries",
        "flaky fails its first 3 attempts on purpose; fail always fails. A failed "
        f"attempt is retried {when} (TASKMAN_RETRY_BACKOFF={tour.pace.retry_backoff})"
        ", as long as its max_retries allows (default 3). Meanwhile the task is "
        "retrying.",
    )
    flaky = tour.submit(client, "flaky", {"fail_times": 3})
    fail = tour.submit(client, "fail", {"message": "boom"}, max_retries=1)
    tour.watch(client, [flaky, fail])
    if flaky.task["status"] != "succeeded" or fail.task["status"] != "failed":
        raise DemoError("flaky should succeed and fail should fail")
    tour.notice(
        f"flaky's attempts climbed to {flaky.task['attempts']} and it succeeded; "
        f"fail gave up after {fail.task['attempts']} attempts (1 + max_retries=1): "
        "failed, with the error of its last attempt."
    )
    tour.wait_for_enter()


def cancel(tour: Tour, client: httpx.Client, how: str = "") -> None:
    tour.step(
        "Cancel a running sleep",
        "A 30-second sleep; as soon as it runs, we DELETE it." + how,
    )
    sleeper = tour.submit(client, "sleep", {"seconds": 30})
    tour.wait_for_status(client, sleeper, "running")
    tour.call(client, "GET", f"/tasks/{sleeper.task['id']}")
    tour.call(client, "DELETE", f"/tasks/{sleeper.task['id']}")
    time.sleep(0.2)
    task = tour.call(client, "GET", f"/tasks/{sleeper.task['id']}").json()
    tour.call(client, "DELETE", f"/tasks/{sleeper.task['id']}")
    if task["status"] != "canceled":
        raise DemoError(f"the sleep is {task['status']}, not canceled")
    ran = datetime.fromisoformat(task["finished_at"]) - datetime.fromisoformat(
        task["started_at"]
    )
    tour.notice(
        f"the sleep stopped after {ran.total_seconds():.1f} s, not 30. A task that "
        "has finished cannot be canceled: 409."
    )
    tour.wait_for_enter()
