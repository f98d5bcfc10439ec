"""What a chaos run found, and the table ``taskman chaos`` prints of it."""

from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from taskman.chaos.ledger import Kill, Tally

# Seconds from the last kill until every accepted task is final.
RECOVERY_TARGET = 30


@dataclass
class ChaosResult(Tally):
    """The tally of the accepted tasks, and the run's own figures."""

    tasks: int
    workers: int
    kills: list[Kill]
    accepted: int
    refused: int  # submissions that never got a 202 (the client gave up)
    resubmits: int  # POST tries beyond the first (503s, dropped connections)
    replays: int  # submissions answered 200: an earlier try had landed
    explained: list[str]  # of the extra attempts, the ones in flight at a kill
    recovery_seconds: float | None  # last kill -> every accepted task final
    submit_seconds: float
    wall_seconds: float
    orphans: int  # processes that outlived the worker killed under them
    leftovers: dict[str, int]  # what is still in RQ's lists at the end
    stuck_detail: dict[str, dict[str, Any]]
    run_dir: str | None  # kept (logs, ledger) when something went wrong

    @property
    def worker_kills(self) -> int:
        return sum(kill.target != "redis" for kill in self.kills)

    @property
    def redis_kills(self) -> int:
        return sum(kill.target == "redis" for kill in self.kills)

    @property
    def flaky(self) -> tuple[int, int]:
        outcomes = self.by_type.get("flaky", {})
        return outcomes.get("succeeded", 0), sum(outcomes.values())

    @property
    def fail(self) -> tuple[int, int]:
        outcomes = self.by_type.get("fail", {})
        return outcomes.get("failed", 0), sum(outcomes.values())

    @property
    def unexplained(self) -> list[str]:
        return sorted(set(self.extra_attempts) - set(self.explained))

    @property
    def ok(self) -> bool:
        flaky_ok, flaky_all = self.flaky
        fail_ok, fail_all = self.fail
        return (
            not self.lost
            and not self.stuck
            and not self.wrong
            and flaky_ok == flaky_all
            and fail_ok == fail_all
            and self.recovery_seconds is not None
        )


def print_summary(result: ChaosResult, console: Console | None = None) -> None:
    """The run's figures as a table, then what went wrong, if anything."""
    console = console or Console()
    verdict = "[green]PASS[/green]" if result.ok else "[red]FAIL[/red]"
    table = Table(title=f"taskman chaos: {verdict}", show_header=False)
    table.add_column("what")
    table.add_column("figure", justify="right")
    flaky_ok, flaky_all = result.flaky
    fail_ok, fail_all = result.fail
    if result.recovery_seconds is None:
        recovery = "[red]never[/red]"
    else:
        recovery = f"{result.recovery_seconds:.1f} s"
        if result.recovery_seconds > RECOVERY_TARGET:
            recovery = f"[red]{recovery}[/red] (target {RECOVERY_TARGET} s)"
    rows = [
        ("tasks planned / accepted", f"{result.tasks} / {result.accepted}"),
        ("workers", str(result.workers)),
        (
            "worker SIGKILLs / Redis SIGKILLs",
            f"{result.worker_kills} / {result.redis_kills}",
        ),
        ("lost (accepted, then 404)", _count(len(result.lost))),
        ("stuck (never final)", _count(len(result.stuck))),
        ("wrong outcome", _count(len(result.wrong))),
        ("flaky succeeded", f"{flaky_ok} / {flaky_all}"),
        ("fail failed", f"{fail_ok} / {fail_all}"),
        ("fail with attempts == max_retries + 1", f"{result.fail_exact} / {fail_all}"),
        ("tasks with extra attempts", str(len(result.extra_attempts))),
        ("  of which in flight at a kill", str(len(result.explained))),
        ("  unexplained", _count(len(result.unexplained))),
        ("final error WorkerLost", str(result.worker_lost)),
        ("dequeued more often than started", str(len(result.hidden_deliveries))),
        ("submissions retried (same key)", str(result.resubmits)),
        ("  answered 200 (had landed)", str(result.replays)),
        ("submissions refused", _count(result.refused)),
        ("orphaned processes", str(result.orphans)),
        ("recovery after the last kill", recovery),
        ("submit time", f"{result.submit_seconds:.1f} s"),
        ("wall time", f"{result.wall_seconds:.1f} s"),
    ]
    for what, figure in rows:
        table.add_row(what, figure)
    console.print(table)
    statuses = Table(title="final status by type")
    statuses.add_column("type")
    for status in ("succeeded", "failed", "other"):
        statuses.add_column(status, justify="right")
    for kind, outcomes in sorted(result.by_type.items()):
        other = sum(v for k, v in outcomes.items() if k not in ("succeeded", "failed"))
        statuses.add_row(
            kind,
            str(outcomes.get("succeeded", 0)),
            str(outcomes.get("failed", 0)),
            str(other),
        )
    console.print(statuses)
    kills = ", ".join(f"{k.target}@{k.at:.1f}s" for k in result.kills)
    console.print(f"[dim]kills: {kills}[/dim]")
    for title, items in (
        ("lost", {i: "404" for i in result.lost}),
        ("stuck", result.stuck),
        ("wrong", result.wrong),
        ("fail tasks with attempts != max_retries + 1", result.fail_off),
        ("unexplained extra attempts", {i: "" for i in result.unexplained}),
    ):
        if items:
            console.print(f"[red]{title}[/red] ({len(items)}):")
            for task_id, why in list(items.items())[:10]:
                console.print(f"  {task_id} {why}")
    if result.stuck_detail:
        console.print_json(data=result.stuck_detail)
    if any(result.leftovers.values()):
        console.print(f"[yellow]left in RQ's lists:[/yellow] {result.leftovers}")
    if result.run_dir:
        console.print(f"[dim]logs and ledger: {result.run_dir}[/dim]")


def _count(value: int) -> str:
    return f"[red]{value}[/red]" if value else "0"
