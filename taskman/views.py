"""How the ``taskman`` commands show tasks: a table for ``list``, a live progress
bar for ``watch`` and ``submit --wait``.

The live view goes to stderr and the final task to stdout (as JSON), so
``taskman submit ... --wait | jq .result`` reads only the outcome.
"""

from itertools import chain
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from taskman.client import TaskClient

STYLES = {
    "scheduled": "cyan",
    "queued": "blue",
    "running": "yellow",
    "retrying": "magenta",
    "succeeded": "green",
    "failed": "red",
    "canceled": "dim",
}


def task_table(tasks: list[dict[str, Any]]) -> Table:
    """One row a task, newest first, as the API listed them."""
    table = Table(title=f"{len(tasks)} task{'s' * (len(tasks) != 1)}")
    table.add_column("id", no_wrap=True, min_width=32)
    for name in ("type", "status", "priority", "progress", "attempts", "created"):
        table.add_column(name, no_wrap=name != "progress")
    for task in tasks:
        status = task["status"]
        table.add_row(
            task["id"],
            task["type"],
            f"[{STYLES.get(status, '')}]{status}[/]",
            task.get("priority", ""),
            _progress(task),
            str(task["attempts"]),
            # To the second: the rest is noise in a table.
            str(task["created_at"])[:19].replace("T", " "),
        )
    return table


def follow(client: TaskClient, task_id: str) -> dict[str, Any]:
    """Show a task live from its event stream until it finishes; the finished
    task. A line for each change of status, a bar for its progress."""
    events = client.events(task_id)
    task = first = next(events)  # what goes wrong at the start is said before any bar
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        bar = progress.add_task(task_id[:8], total=None, message="")
        status = None
        for task in chain([first], events):
            if task["status"] != status:
                status = task["status"]
                line = f"{task_id} [{STYLES.get(status, '')}]{status}[/]"
                if task.get("error"):
                    line += f": {task['error']}"
                progress.console.print(line, soft_wrap=True, highlight=False)
            done = task.get("progress") or {}
            progress.update(
                bar,
                description=f"{task_id[:8]} {status}",
                completed=done.get("done", 0),
                total=done.get("total") or None,
                message=done.get("message") or "",
            )
            if status == "succeeded" and not done:  # no progress told: a full bar
                progress.update(bar, total=1, completed=1)
    return task


def _progress(task: dict[str, Any]) -> str:
    done = task.get("progress")
    if not done:
        return ""
    text = f"{done['done']}/{done['total']}"
    return f"{text} {done['message']}" if done.get("message") else text
