"""``taskman demo``: a narrated tour of the three phases, live, against real
processes: what each phase promises, and what it cannot keep.

Every server, worker and Redis it starts is stopped again when it ends, on an error,
Ctrl-C, SIGTERM or a closed terminal included (a second Ctrl-C stops them at once).
"""

import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import httpx
import redis
from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from taskman.phases import queued
from taskman.processes import (
    Process,
    alive,
    command_line,
    descendants,
    parent,
    send,
    start,
    stop,
    stop_tree,
    taskman_command,
    wait_healthy,
)
from taskman.redis_server import EmbeddedRedis, free_port

FINISHED = ("succeeded", "failed", "canceled")
STYLES = {
    "queued": "white",
    "running": "cyan",
    "retrying": "yellow",
    "succeeded": "green",
    "failed": "red",
    "canceled": "magenta",
}
Task = dict[str, Any]


class DemoError(Exception):
    """Something did not happen as the narration says it would."""


@dataclass(frozen=True)
class Pace:
    """How long things take: real durations for a class, short ones for the tests."""

    poll: float  # seconds between two rounds of GETs in the task tables
    sleep: float  # the sleep task of the mix
    hash_iterations: int
    primes_limit: int
    retry_backoff: str  # TASKMAN_RETRY_BACKOFF
    heartbeat: int  # TASKMAN_JOB_HEARTBEAT_SECONDS
    queued_sleep: float  # the tasks that wait while a server restarts
    doomed_sleep: float  # the task whose worker is killed
    cached_sleep: float  # the task whose answer gets cached


NORMAL = Pace(0.25, 3, 2_000_000, 20_000_000, "1,2,4", 4, 10, 6, 1.5)
FAST = Pace(0.05, 0.5, 100_000, 1_000_000, "0", 2, 5, 1.5, 0.3)


# --- the processes the demo starts


class Processes:
    """The processes of one phase; ``close()`` stops them all, newest first.

    They run in sessions of their own: a Ctrl-C in the terminal reaches the demo
    only, which then stops them in order (API and workers before Redis). If the
    demo itself is killed (kill -9), Linux sends them SIGTERM, and `taskman serve`
    then stops its own children.
    """

    def __init__(self, console: Console, logs: Path) -> None:
        self.console = console
        self.logs = logs
        self.running: list[Process] = []
        self.names: dict[int, str] = {}
        self.seen: set[int] = set()  # every pid started, and the children we saw
        self.orphans: set[int] = set()  # children of a process we killed
        self._hurry = False

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        """``python -m taskman ARGS``, its output in logs/NAME.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        process = start(
            taskman_command(*args),
            env=env,
            # A directory of ours: no .env file of the user's is read, the demo's
            # settings are all in env.
            cwd=self.logs,
            log=self.logs / f"{name}.log",
            own_session=True,
        )
        self._track(process, name)
        return process

    def start_redis(self, data_dir: Path) -> EmbeddedRedis:
        server = EmbeddedRedis(data_dir)
        try:
            server.start()
        finally:
            if server.process is not None:
                self._track(server.process, "redis-server")
        return server

    def _track(self, process: Process, name: str) -> None:
        self.running.append(process)
        self.names[process.pid] = name
        self.seen.add(process.pid)

    def log(self, process: Process) -> Path:
        return self.logs / f"{self.names[process.pid]}.log"

    def stop(self, process: Process, timeout: float = 30) -> int:
        """SIGTERM, wait, SIGKILL if need be; then any child it left behind."""
        self.seen |= stop_tree(process, timeout, hurry=lambda: self._hurry)
        if process in self.running:
            self.running.remove(process)
        return process.wait()

    def kill(self, process: Process) -> set[int]:
        """``kill -9`` of that one process, as a crash would; its children live on
        (they are stopped with the rest at the end). Returns them."""
        children = descendants(process.pid)
        self.seen |= children
        stop(process, kill=True)
        self.running.remove(process)
        self.orphans |= children
        return {pid for pid in children if alive(pid)}

    def close(self) -> None:
        """Stop everything, newest first; a second Ctrl-C kills what is left."""

        def hurry(signum: int, frame: FrameType | None) -> None:
            self._hurry = True

        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {signum: signal.signal(signum, hurry) for signum in signals}
        try:
            for process in reversed(list(self.running)):
                self.stop(process)
            for pid in self.orphans:
                send(pid, signal.SIGKILL)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        time.sleep(0.1)
        left = sorted(pid for pid in self.seen if alive(pid))
        if left:
            self.console.print(f"[red]Still running after clean-up: {left}[/red]")
        else:
            self.console.print(
                f"[dim]Stopped every process this phase started "
                f"({len(self.seen)} in all).[/dim]"
            )

    def __enter__(self) -> "Processes":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def base_env() -> dict[str, str]:
    """Our environment without any TASKMAN_* setting: the demo sets its own. The
    children run elsewhere, so they are told where this checkout is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMAN_")}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


# --- the narration


@dataclass
class Watched:
    label: str
    task: Task
    seen: list[str] = field(default_factory=list)
    changed_at: list[float] = field(default_factory=list)  # monotonic, per seen

    def record(self, task: Task) -> None:
        self.task = task
        status = task["status"]
        running = status in ("running", "retrying")
        entry = f"{status}#{task['attempts']}" if running else status
        if not self.seen or self.seen[-1] != entry:
            self.seen.append(entry)
            self.changed_at.append(time.monotonic())


class Tour:
    def __init__(self, console: Console, pace: Pace, pause: bool) -> None:
        self.console = console
        self.pace = pace
        self.pause = pause and sys.stdin.isatty()
        self.phase_number = 0
        self.step_number = 0
        self.recap: list[str] = []

    # layout

    def phase(self, number: int, title: str, idea: str) -> None:
        self.phase_number, self.step_number = number, 0
        self.console.print()
        self.console.print(
            Panel(idea, title=f"[bold]Phase {number}: {title}", border_style="blue")
        )

    def step(self, title: str, *lines: str) -> None:
        self.step_number += 1
        self.console.print()
        self.console.rule(
            f"[bold]{self.phase_number}.{self.step_number}  {title}", align="left"
        )
        for line in lines:
            self.say(line)

    def say(self, text: str) -> None:
        self.console.print(text)

    def notice(self, text: str) -> None:
        self.console.print(f"[bold yellow]Notice:[/bold yellow] {text}")

    def key(self, text: str) -> None:
        """A result worth remembering: printed, and repeated in the recap."""
        self.console.print(f"[bold green]>>> {text}[/bold green]")
        self.recap.append(f"Phase {self.phase_number}: {text}")

    def shell(self, env: dict[str, str], args: list[str]) -> None:
        assignments = " ".join(f"{k}={v}" for k, v in env.items())
        line = f"{assignments} taskman {' '.join(args)}".strip()
        self.console.print(f"[bold]$ {escape(line)}[/bold]")

    def wait_for_enter(self) -> None:
        if not self.pause:
            return
        with contextlib.suppress(EOFError):
            self.console.input("[dim]Press Enter for the next step...[/dim]")

    # HTTP

    def call(
        self,
        client: httpx.Client,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        show: tuple[str, ...] = (),
        quiet: bool = False,
        compact: bool = False,
    ) -> httpx.Response:
        """Send a request and print it, with the key fields of the answer (on one
        line if ``compact``)."""
        response = client.request(method, path, json=body, headers=headers)
        if quiet:
            return response
        sent = f"{method} {path}"
        if headers:
            sent += "  " + "  ".join(f"{k}: {v}" for k, v in headers.items())
        if body is not None:
            sent += "  " + json.dumps(body)
        if compact:
            self.console.print(f"  [blue]→ {escape(sent)}[/blue]  ← {answer(response)}")
        else:
            self.console.print(f"  [blue]→ {escape(sent)}[/blue]")
            self.console.print(f"  ← {answer(response)}")
        for name in show:
            if name in response.headers:
                value = escape(response.headers[name])
                self.console.print(f"      [dim]{name}:[/dim] {value}")
        return response

    def submit(
        self,
        client: httpx.Client,
        type_: str,
        payload: dict[str, Any],
        max_retries: int | None = None,
        show: tuple[str, ...] = (),
        compact: bool = False,
    ) -> Watched:
        body: dict[str, Any] = {"type": type_, "payload": payload}
        if max_retries is not None:
            body["max_retries"] = max_retries
        response = self.call(client, "POST", "/tasks", body, show=show, compact=compact)
        if response.status_code != 202:
            raise DemoError(f"POST /tasks answered {response.status_code}")
        return Watched(label(type_, payload), response.json())

    def watch(
        self, client: httpx.Client, tasks: list[Watched], timeout: float = 90
    ) -> None:
        """Poll every task and show a table of them until all have finished."""
        deadline = time.monotonic() + timeout

        def poll() -> bool:
            for watched in tasks:
                if watched.task["status"] not in FINISHED:
                    response = client.get(f"/tasks/{watched.task['id']}")
                    if response.status_code == 200:
                        watched.record(response.json())
            return all(w.task["status"] in FINISHED for w in tasks)

        for watched in tasks:
            watched.record(watched.task)
        if self.console.is_terminal:
            with Live(
                task_table(tasks), console=self.console, auto_refresh=False
            ) as live:
                while not poll() and time.monotonic() < deadline:
                    live.update(task_table(tasks), refresh=True)
                    time.sleep(self.pace.poll)
                live.update(task_table(tasks), refresh=True)
        else:  # a log or a pipe: the final table only
            while not poll() and time.monotonic() < deadline:
                time.sleep(self.pace.poll)
            self.console.print(task_table(tasks))
        late = [w.label for w in tasks if w.task["status"] not in FINISHED]
        if late:
            raise DemoError(f"not finished after {timeout:.0f} s: {', '.join(late)}")

    def wait_for_status(
        self, client: httpx.Client, watched: Watched, status: str, timeout: float = 30
    ) -> None:
        deadline = time.monotonic() + timeout
        while watched.task["status"] != status:
            if time.monotonic() > deadline:
                raise DemoError(f"{watched.label} never became {status}")
            time.sleep(0.05)
            watched.record(client.get(f"/tasks/{watched.task['id']}").json())


def label(type_: str, payload: dict[str, Any]) -> str:
    """What a task is, in a few words."""
    if type_ == "sleep":
        return f"sleep {payload['seconds']:g} s"
    if type_ == "primes":
        return f"primes ≤ {payload['limit']:,}"
    if type_ == "hash":
        return f"hash, {payload['iterations']:,} rounds"
    if type_ == "flaky":
        return f"flaky, fails {payload['fail_times']} times"
    if type_ == "echo":
        return f"echo {json.dumps(payload['value'])}"
    return type_


def short(task_id: str) -> str:
    return task_id[:8]


def answer(response: httpx.Response) -> str:
    """The status line and the fields that matter, as rich markup."""
    line = f"[bold]{response.status_code} {response.reason_phrase}[/bold]"
    if response.request.method == "POST":
        line += f" in {response.elapsed.total_seconds() * 1000:.0f} ms"
    try:
        data = response.json()
    except ValueError:
        return line
    if isinstance(data, dict) and "status" in data and "id" in data:
        status = data["status"]
        line += (
            f" · {data['type']} {short(data['id'])} · "
            f"[{STYLES.get(status, 'white')}]{status}[/]"
        )
        if data.get("attempts"):
            line += f" · attempts {data['attempts']}"
        if data.get("result") is not None:
            line += f" · result {escape(json.dumps(data['result']))}"
        if data.get("error"):
            line += f" · error [red]{escape(data['error'])}[/red]"
    elif isinstance(data, dict) and "detail" in data:
        line += f" · detail: {escape(str(data['detail']))}"
    else:
        line += f" · {escape(json.dumps(data))}"
    return line


def task_table(tasks: list[Watched]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("task", "id", "status", "attempts", "time", "result / error"):
        table.add_column(column, no_wrap=column != "result / error")
    table.add_column("statuses seen (#attempt)", style="dim")
    for watched in tasks:
        task = watched.task
        status = task["status"]
        created = datetime.fromisoformat(task["created_at"])
        end = (
            datetime.fromisoformat(task["finished_at"])
            if task.get("finished_at")
            else datetime.now(UTC)
        )
        if task.get("error"):
            outcome = f"[red]{escape(task['error'][:60])}[/red]"
        elif task.get("result") is not None:
            outcome = escape(json.dumps(task["result"])[:40])
        else:
            outcome = ""
        table.add_row(
            watched.label,
            short(task["id"]),
            f"[{STYLES.get(status, 'white')}]{status}[/]",
            f"{task['attempts']}/{task['max_retries'] + 1}",
            f"{max(0.0, (end - created).total_seconds()):.1f} s",
            outcome,
            " → ".join(watched.seen),
        )
    return table


# --- starting and stopping servers


def serve(
    tour: Tour,
    procs: Processes,
    name: str,
    phase: int,
    port: int,
    workers: int,
    env: dict[str, str],
    shown: dict[str, str],
) -> Process:
    """Start ``taskman serve`` (printing the command), wait until it answers."""
    args = ["serve", "--phase", str(phase), "--port", str(port)]
    if queued(phase):
        args += ["--workers", str(workers)]
    tour.shell(shown, args)
    process = procs.start(name, args, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout=60)
    except RuntimeError as error:  # it exited: the end of its log says why
        log = procs.log(process).read_text(errors="replace")
        tail = "\n".join(log.splitlines()[-15:])
        raise DemoError(f"{error}:\n{tail}") from None
    except TimeoutError as error:
        raise DemoError(str(error)) from None
    tour.say(f"[dim]Up: pid {process.pid}, {url} (log: {procs.log(process)})[/dim]")
    return process


def role(pid: int, server: int) -> str:
    """What a process below ``taskman serve`` is, for the process tables."""
    if "redis-server" in command_line(pid):
        return "Redis"
    if parent(pid) == server:
        return "worker"
    return "RQ scheduler (a worker's child)"


def show_processes(tour: Tour, rows: list[tuple[str, int]]) -> None:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("role")
    table.add_column("pid", justify="right")
    table.add_column("command", style="dim")
    for role, pid in rows:
        table.add_row(role, str(pid), escape(command_line(pid)[:90]))
    tour.console.print(table)


# --- phase 1


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


# --- phase 2


def phase2(tour: Tour, workdir: Path) -> None:
    pace = tour.pace
    tour.phase(
        2,
        "a queue that outlives every process",
        "The API writes each task to Redis as an RQ job and answers 202; separate "
        "worker processes take the jobs and run them. The API, a worker, even Redis "
        "can die: what got a 202 is still there afterwards.",
    )
    port = free_port()
    with Processes(tour.console, workdir / "logs" / "phase2") as procs:
        tour.step(
            "Start Redis, the API and two workers",
            "This time we start each piece ourselves, to be able to kill one: Redis "
            "(append-only file on), the API alone (--workers 0), and two `taskman "
            "worker` processes.",
            f"TASKMAN_JOB_HEARTBEAT_SECONDS={pace.heartbeat} (default 10): a worker "
            f"that dies mid-task is noticed after ~{pace.heartbeat} s, so step 2.5 "
            "takes seconds, not half a minute.",
        )
        redis_server = procs.start_redis(workdir / "phase2" / "redis")
        redis_url = redis_server.url
        shown = {
            "TASKMAN_REDIS_URL": redis_url,
            "TASKMAN_JOB_HEARTBEAT_SECONDS": str(pace.heartbeat),
            "TASKMAN_RETRY_BACKOFF": pace.retry_backoff,
        }
        env = {**base_env(), **shown, "TASKMAN_DATA_DIR": str(workdir / "phase2")}
        tour.say(f"[dim]redis-server on {redis_url}[/dim]")
        api = serve(tour, procs, "api", 2, port, 0, env, shown)
        tour.shell(shown, ["worker", "--phase", "2"])
        tour.say("[dim](twice)[/dim]")
        workers = [
            procs.start(f"worker-{n}", ["worker", "--phase", "2"], env) for n in (1, 2)
        ]
        assert redis_server.process is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 30
            while client.get("/health").json().get("workers", 0) < 2:
                if time.monotonic() > deadline:
                    raise DemoError("the workers did not register with Redis")
                time.sleep(0.1)
            show_processes(
                tour,
                [("Redis", redis_server.process.pid), ("API", api.pid)]
                + [(f"worker {n}", w.pid) for n, w in enumerate(workers, 1)],
            )
            tour.call(client, "GET", "/health")
            tour.wait_for_enter()

            tour.step(
                "The same mix, run by the workers",
                "The same requests as in phase 1, plus a flaky task and a fail "
                "without retries.",
            )
            mix = [
                *submit_mix(tour, client),
                tour.submit(client, "flaky", {"fail_times": 2}),
                tour.submit(client, "fail", {"message": "boom"}, max_retries=0),
            ]
            tour.watch(client, mix)
            tour.notice(
                "same answers as phase 1 (the routes are the same file). The work "
                "ran in the workers, and flaky's retries went back through Redis: "
                "a retry that has a delay waits in RQ's scheduled registry."
            )
            tour.wait_for_enter()

            cancel(
                tour,
                client,
                " DELETE marks the job canceled in Redis; the task checks that "
                "every ~50 ms in its worker, and stops.",
            )

            tour.step(
                "Restart the API while tasks wait",
                "Four sleeps for two workers: two run, two wait, in Redis this time.",
            )
            kept = [
                tour.submit(client, "sleep", {"seconds": pace.sleep}, compact=True)
                for _ in range(4)
            ]
            time.sleep(0.3)
            tour.call(client, "GET", "/health")
            tour.say(f"[bold]$ kill -TERM {api.pid}[/bold]")
            procs.stop(api)
            try:
                client.get("/health")
            except httpx.TransportError as error:
                tour.say(f"  [blue]→ GET /health[/blue]\n  ← [red]{error}[/red]")
            tour.say(
                "The API is down, the workers are not: they keep taking jobs from "
                "Redis. Start the API again:"
            )
            api = serve(tour, procs, "api-again", 2, port, 0, env, shown)
            tour.watch(client, kept)
            done = sum(w.task["status"] == "succeeded" for w in kept)
            tour.key(f"Kept: {done} of {len(kept)} tasks survived the API restart.")
            if done != len(kept):
                raise DemoError("phase 2 was expected to keep every task")
            tour.wait_for_enter()

            kill_worker(tour, client, procs, workers, redis_url)


def kill_worker(
    tour: Tour,
    client: httpx.Client,
    procs: Processes,
    workers: list[Process],
    redis_url: str,
) -> None:
    pace = tour.pace
    tour.step(
        "Kill a worker mid-task",
        f"A {pace.doomed_sleep:g}-second sleep; while it runs, we kill -9 the worker "
        "running it.",
    )
    doomed = tour.submit(client, "sleep", {"seconds": pace.doomed_sleep})
    tour.wait_for_status(client, doomed, "running")
    connection = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        job_key = f"rq:job:{doomed.task['id']}"
        name = connection.hget(job_key, "worker_name")
        pid = connection.hget(f"rq:worker:{name}", "pid")
    finally:
        connection.close()
    victim = next((w for w in workers if str(w.pid) == str(pid)), None)
    if victim is None:
        raise DemoError(f"no worker of ours runs the task (pid {pid})")
    tour.say(
        f"RQ records who took the job: [bold]{job_key}[/bold] worker_name={name}, "
        f"and [bold]rq:worker:{name}[/bold] pid={pid}: our worker "
        f"{workers.index(victim) + 1}."
    )
    tour.say(f"[bold]$ kill -KILL {pid}[/bold]")
    survivors = procs.kill(victim)
    killed_at = time.monotonic()
    if survivors:
        tour.say(
            f"[dim](pid {', '.join(map(str, sorted(survivors)))}, its RQ scheduler, "
            "a forked child, outlives a kill -9 of its parent; the demo stops it "
            "at the end.)[/dim]"
        )
    beat = pace.heartbeat
    tour.say(
        "For a few seconds the task still reads running: nobody knows yet that its "
        f"worker is dead. Once the job's heartbeat ({beat} s) has expired, the other "
        f"worker's clean-up (every {max(1, beat // 2)} s) finds it and retries it "
        "(it has retries left): retrying, then running again, from the start."
    )
    tour.watch(client, [doomed], timeout=120)
    task = doomed.task
    finished = time.monotonic() - killed_at
    if task["status"] != "succeeded" or task["attempts"] < 2:
        raise DemoError(
            f"the task ended {task['status']} on attempt {task['attempts']}"
        )
    noticed = next(
        (
            at - killed_at
            for seen, at in zip(doomed.seen, doomed.changed_at, strict=True)
            if seen != "running#1"
        ),
        finished,
    )
    tour.say(
        f"The lost attempt was noticed {noticed:.1f} s after the kill; attempt 2 "
        f"then ran the whole {pace.doomed_sleep:g} s sleep again."
    )
    tour.key(
        f"Recovered: task {short(task['id'])} succeeded on attempt {task['attempts']}, "
        f"{finished:.1f} s after its worker was killed."
    )
    tour.notice(
        "delivery is at least once: a task can run twice, so task functions should "
        "be idempotent (ours are deterministic)."
    )
    tour.wait_for_enter()


# --- phase 3


def phase3(tour: Tour, workdir: Path) -> None:
    tour.phase(
        3,
        "production: protection, visibility, speed",
        "Phase 2 plus what a shared service needs: per-client rate limits, the "
        "rq-dashboard behind a password, a result cache for polling clients, and "
        "metrics. Each is a layer around the same app and the same workers.",
    )
    password = secrets.token_urlsafe(12)
    shown = {
        "TASKMAN_RATE_LIMIT_SUBMIT": "5/second",
        "TASKMAN_DASHBOARD_PASSWORD": password,
    }
    env = {
        **base_env(),
        **shown,
        "TASKMAN_REDIS_URL": "",
        "TASKMAN_DATA_DIR": str(workdir / "phase3"),
        "TASKMAN_RETRY_BACKOFF": tour.pace.retry_backoff,
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Processes(tour.console, workdir / "logs" / "phase3") as procs:
        tour.step(
            "Start phase 3",
            "This time `taskman serve` starts its own embedded Redis and two "
            "workers. TASKMAN_RATE_LIMIT_SUBMIT=5/second (default 20/second) makes "
            "the limit easy to reach; the dashboard password is made up for this "
            "run.",
        )
        server = serve(tour, procs, "serve-3", 3, port, 2, env, shown)
        show_processes(
            tour,
            [("serve (API)", server.pid)]
            + [(role(pid, server.pid), pid) for pid in sorted(descendants(server.pid))],
        )
        with httpx.Client(base_url=url, timeout=10) as client:
            tour.call(client, "GET", "/health")
            tour.say("Every task request now carries its budget:")
            first = tour.submit(
                client,
                "echo",
                {"value": "hello"},
                show=("RateLimit-Policy", "RateLimit"),
            )
            tour.notice(
                'RateLimit-Policy: 5 requests ("q") per 1-second window ("w"). '
                'RateLimit: what is left ("r") and seconds until the window '
                'resets ("t").'
            )
            tour.wait_for_enter()

            rate_limit(tour, client)
            cache(tour, client, first)
            dashboard(tour, client, url, password)


def rate_limit(tour: Tour, client: httpx.Client) -> None:
    tour.step(
        "Hit the rate limit",
        "Ten POSTs as fast as we can; the limit is 5 per second per client.",
    )
    time.sleep(1.1)  # a fresh window, whatever came before
    limited = None
    for n in range(10):
        response = tour.call(
            client,
            "POST",
            "/tasks",
            {"type": "echo", "payload": {"value": n}},
            show=("RateLimit",) if n < 5 else (),
            quiet=True,
        )
        tour.say(
            f"  [blue]→ POST /tasks #{n + 1}[/blue]  ← {answer(response)}  "
            f"[dim]RateLimit: {escape(response.headers.get('RateLimit', '-'))}[/dim]"
        )
        if response.status_code == 429:
            limited = response
            break
    if limited is None:
        raise DemoError("ten POSTs in a row were never refused")
    tour.say("The refusal in full:")
    for name in (
        "Retry-After",
        "RateLimit-Policy",
        "RateLimit",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    ):
        tour.say(f"      [dim]{name}:[/dim] {escape(limited.headers.get(name, '-'))}")
    retry_after = int(limited.headers["Retry-After"])
    tour.key(
        f"429 Too Many Requests after {n} tasks in a second; Retry-After: {retry_after}"
    )
    tour.say(f"We wait the {retry_after} s it asks for, and try again:")
    time.sleep(retry_after)
    tour.call(
        client,
        "POST",
        "/tasks",
        {"type": "echo", "payload": {"value": "again"}},
        show=("RateLimit",),
    )
    tour.notice(
        "the counts live in Redis, so several API processes share one budget; "
        "/health, /metrics and /dashboard are never limited."
    )
    tour.wait_for_enter()


def cache(tour: Tour, client: httpx.Client, first: Watched) -> None:
    pace = tour.pace
    tour.step(
        "The result cache: X-Cache and 304",
        "Clients poll GET /tasks/{id}. A finished task no longer changes, so phase "
        "3 keeps it in a cache (this process's memory, then Redis). We poll a short "
        "sleep and watch the X-Cache header:",
    )
    sleeper = tour.submit(client, "sleep", {"seconds": pace.cached_sleep})
    path = f"/tasks/{sleeper.task['id']}"
    deadline = time.monotonic() + 30
    while True:
        response = tour.call(client, "GET", path, show=("X-Cache",))
        if response.json()["status"] in FINISHED:
            break
        if time.monotonic() > deadline:
            raise DemoError("the sleep never finished")
        time.sleep(max(pace.poll, pace.cached_sleep / 3))
    tour.say("It has finished; the answer was stored. Ask again:")
    hit = tour.call(client, "GET", path, show=("X-Cache", "ETag"))
    if hit.headers.get("X-Cache") != "HIT":
        raise DemoError(f"expected X-Cache: HIT, got {hit.headers.get('X-Cache')}")
    tour.key("X-Cache: HIT on the second read of a finished task")
    tour.say(
        "A poller that sends the ETag back in If-None-Match learns that nothing "
        "changed without getting the body again:"
    )
    not_modified = tour.call(
        client,
        "GET",
        path,
        headers={"If-None-Match": hit.headers["ETag"]},
        show=("X-Cache", "ETag"),
    )
    if not_modified.status_code != 304:
        raise DemoError(f"expected 304, got {not_modified.status_code}")
    tour.key(f"304 Not Modified, {len(not_modified.content)} bytes of body")
    tour.notice(
        "only finished tasks are cached, and never wrongly: a requeue or delete "
        "from the dashboard changes the job's status in Redis, which drops the "
        "entry."
    )
    tour.wait_for_enter()


def dashboard(tour: Tour, client: httpx.Client, url: str, password: str) -> None:
    tour.step(
        "The dashboard and the metrics",
        "rq-dashboard is mounted at /dashboard, behind HTTP Basic auth:",
    )
    tour.console.print(
        Panel(
            f"URL       [bold]{url}/dashboard/[/bold]\n"
            f"user      [bold]admin[/bold]\n"
            f"password  [bold]{password}[/bold]",
            title="rq-dashboard",
            expand=False,
            border_style="green",
        )
    )
    tour.call(client, "GET", "/dashboard/", show=("WWW-Authenticate",))
    with httpx.Client(base_url=url, timeout=10, auth=("admin", password)) as admin:
        response = admin.get("/dashboard/")
    tour.say(
        f"  [blue]→ GET /dashboard/  (user admin and the password)[/blue]\n"
        f"  ← [bold]{response.status_code} {response.reason_phrase}[/bold] · "
        f"{len(response.content):,} bytes of HTML"
    )
    tour.say("And GET /metrics, for Prometheus (a few of its lines):")
    metrics = client.get("/metrics").text.splitlines()
    wanted = (
        "taskman_tasks_total{",
        "taskman_task_outcomes_total{",
        "taskman_rate_limited_requests_total{",
        "taskman_cache_hits_total ",
        "taskman_cache_misses_total ",
        "taskman_queue_depth ",
    )
    for line in metrics:
        if line.startswith(wanted) and not line.endswith(" 0.0"):
            tour.say(f"  [dim]{escape(line)}[/dim]")
    if tour.pause:
        tour.say(
            "[bold]Open the dashboard in a browser now: it stays up until you "
            "press Enter.[/bold]"
        )
    tour.wait_for_enter()


# --- the whole tour

TOURS: dict[int, Callable[[Tour, Path], None]] = {1: phase1, 2: phase2, 3: phase3}


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C: clean-up runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {
        signum: signal.signal(signum, interrupt)
        for signum in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(phases: list[int], pause: bool = False, fast: bool = False) -> int:
    """Run the tour of ``phases``; the exit code (0, 1 on an error, 130 on Ctrl-C)."""
    console = Console(width=None if sys.stdout.isatty() else 120, highlight=False)
    tour = Tour(console, FAST if fast else NORMAL, pause)
    console.rule("[bold]taskman demo")
    console.print(
        "Real servers, workers and Redis, started for this tour on free ports and "
        "stopped at the end. Every request shown is sent for real."
        + ("" if tour.pause else " (--pause waits for Enter between steps.)")
    )
    try:
        tour.wait_for_enter()
        with (
            stopped_by_signals(),
            tempfile.TemporaryDirectory(prefix="taskman-demo-") as workdir,
        ):
            for phase in phases:
                TOURS[phase](tour, Path(workdir))
    except KeyboardInterrupt:
        console.print("\n[yellow]Interrupted.[/yellow]")
        return 130
    except (DemoError, httpx.HTTPError, redis.RedisError) as error:
        console.print(Panel(escape(str(error)), title="demo failed", style="red"))
        return 1
    console.print()
    console.print(
        Panel(
            "\n".join(tour.recap) or "-",
            title="[bold]What we saw",
            border_style="green",
            expand=False,
        )
    )
    return 0
