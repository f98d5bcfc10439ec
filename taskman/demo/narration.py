"""How the demo speaks: steps and notices, each request it sends and the answer,
and live tables of the tasks it watches."""

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

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
