"""The processes the demo starts, and how it shows them: each server, worker and
Redis is stopped again when the demo ends, on an error, Ctrl-C, SIGTERM or a
closed terminal included (a second Ctrl-C stops them at once)."""

import os
import signal
import time
from pathlib import Path
from types import FrameType, TracebackType

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from taskman.demo.narration import DemoError, Tour
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
from taskman.redis_server import EmbeddedRedis


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
