"""The whole tour: the phases asked for, one after the other, and the recap."""

import contextlib
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import httpx
import redis
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from taskman.demo.narration import FAST, NORMAL, DemoError, Tour
from taskman.demo.phase1 import phase1
from taskman.demo.phase2 import phase2
from taskman.demo.phase3 import phase3

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
