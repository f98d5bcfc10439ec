"""The processes the tools run: start an API or a ``taskman`` command, wait until it
is healthy, stop it and what it started, and look at processes in Linux's /proc.

Written once for bench, chaos, demo, ``taskman serve`` and the tests. Elsewhere than
Linux the /proc functions see no process: a tree is then stopped at its root only.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path

import httpx

from common.process import die_with_parent
from taskman.http import uvicorn_argv, uvicorn_options

Process = subprocess.Popen[bytes]
# Where a child's output goes: a log file (appended to; stderr too), DEVNULL, or
# None (ours: it writes to our terminal).
Output = Path | int | None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- start


def taskman_command(*args: str) -> list[str]:
    """``taskman ARGS``, run by this very Python (so from this checkout)."""
    return [sys.executable, "-m", "taskman", *args]


def api_command(module: str, port: int) -> list[str]:
    """``uvicorn --factory module:create_app``, the same settings for every app."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        f"{module}:create_app",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        *uvicorn_argv(uvicorn_options()),
    ]


def start(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log: Output = subprocess.DEVNULL,
    own_session: bool = False,
) -> Process:
    """Start ``argv`` with ``env`` as its whole environment (None: ours).

    ``own_session``: it runs in a session of its own, so a Ctrl-C in the terminal
    reaches us only and we stop it in our own order; if we die without stopping it
    (kill -9), Linux sends it SIGTERM.
    """
    with ExitStack() as stack:
        # A log file is ours to close once the child has its own copy.
        out = stack.enter_context(open(log, "ab")) if isinstance(log, Path) else log
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL if own_session else None,
            stdout=out,
            stderr=subprocess.STDOUT if isinstance(log, Path) else log,
            start_new_session=own_session,
            preexec_fn=_die_with_parent if own_session else None,
        )


def _die_with_parent() -> None:
    # Runs in the child before exec. SIGTERM, not SIGKILL: a `taskman serve` then
    # stops its own children, and Redis fsyncs.
    die_with_parent(signal.SIGTERM)


def start_api(
    module: str,
    env: dict[str, str] | None = None,
    *,
    port: int | None = None,
    cwd: Path | None = None,
    log: Output = subprocess.DEVNULL,
) -> tuple[Process, str]:
    """Serve ``module``'s app under uvicorn on ``port`` (a free one by default);
    the process and its URL. It is not up yet: see :func:`wait_healthy`."""
    port = port or free_port()
    process = start(api_command(module, port), env=env, cwd=cwd, log=log)
    return process, f"http://127.0.0.1:{port}"


def _answers_200(response: httpx.Response) -> bool:
    return response.status_code == 200


def wait_healthy(
    url: str,
    process: Process | None = None,
    timeout: float = 30,
    *,
    path: str = "/health",
    ready: Callable[[httpx.Response], bool] = _answers_200,
) -> httpx.Response:
    """Poll GET ``url`` + ``path`` until its answer is ``ready`` (a 200); that answer.

    RuntimeError if ``process`` (the server) exits first, TimeoutError after
    ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            response = httpx.get(f"{url}{path}", timeout=2)
            if ready(response):
                return response
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.1)


# --- stop


def _never() -> bool:
    return False


def stop(
    process: Process,
    timeout: float = 20,
    *,
    kill: bool = False,
    hurry: Callable[[], bool] = _never,
) -> int:
    """SIGTERM (or SIGKILL) a child, SIGKILL it if it is still there after
    ``timeout`` seconds or once ``hurry()`` says so; reap it. Its exit code."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0 or hurry():
                process.kill()
                break
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=min(left, 0.05))
    return process.wait()


def stop_tree(
    process: Process, timeout: float = 20, *, hurry: Callable[[], bool] = _never
) -> set[int]:
    """:func:`stop` a child, then SIGKILL whatever it left running below it (a
    worker's forked scheduler, say). The pids that were below it."""
    below = descendants(process.pid)
    stop(process, timeout, hurry=hurry)
    for pid in below:
        send(pid, signal.SIGKILL)
    return below


def send(pid: int, sig: signal.Signals, started: int | None = None) -> None:
    """Signal ``pid`` if it is :func:`alive` (and the same process, with ``started``)."""
    if alive(pid, started):
        with suppress(OSError):
            os.kill(pid, sig)


# --- /proc


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat from its state field on ([] if gone): the command name,
    which may hold spaces and parentheses, is cut off."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text.rsplit(")", 1)[1].split()


# Indexes into _stat(), after proc(5)'s fields 3 (state) and on.
_STATE, _PPID, _UTIME, _STIME, _STARTTIME = 0, 1, 11, 12, 19


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        pid = int(stat_file.parent.name)
        fields = _stat(pid)
        if fields:  # else gone meanwhile
            children.setdefault(int(fields[_PPID]), []).append(pid)
    return children


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    return _children_by_parent().get(pid, [])


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    tree = _children_by_parent()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def parent(pid: int) -> int:
    """The parent of ``pid`` (0 if it is gone)."""
    fields = _stat(pid)
    return int(fields[_PPID]) if fields else 0


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (None if gone). Pids are
    reused (pid_max may be 32768, which wraps in minutes): the pair (pid, start)
    names one process where a pid alone may name someone else later."""
    fields = _stat(pid)
    return int(fields[_STARTTIME]) if fields else None


def alive(pid: int, started: int | None = None) -> bool:
    """Running (a zombie, dead but not yet reaped, is not); with ``started``, and
    still the process that started then, not a reused pid."""
    fields = _stat(pid)
    if not fields or fields[_STATE] == "Z":
        return False
    return started is None or int(fields[_STARTTIME]) == started


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used so far, user and system (0.0 if it is gone)."""
    fields = _stat(pid)
    if not fields:
        return 0.0
    ticks = int(fields[_UTIME]) + int(fields[_STIME])
    return ticks / os.sysconf("SC_CLK_TCK")


def command_line(pid: int) -> str:
    """How ``pid`` was started, as one line ("?" if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
