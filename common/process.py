"""Child processes that cannot outlive us."""

import ctypes
import os
import signal
import stat
import subprocess
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies, even by
    SIGKILL. Call it in the child. Elsewhere it does nothing: there the parent's
    own shutdown has to reap its children."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


def close_inherited_sockets() -> None:
    """Close every socket this (just forked) process inherited from its parent.

    A forked child holds copies of its parent's connections. If the parent is
    killed while blocked in a Redis command (a worker in BLMOVE), the copies keep
    that connection open, and Redis hands the next job to a client nobody reads.
    Call it first thing in the child; the child opens its own connections.
    Linux only (it lists /proc/self/fd); elsewhere it does nothing.
    """
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in descriptors:
        fd = int(name)
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass  # the listing's own descriptor, already closed


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc; elsewhere, none)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def stop(
    process: "subprocess.Popen[bytes]", timeout: float = 20, kill: bool = False
) -> None:
    """SIGTERM (or SIGKILL) a child, and SIGKILL it if it is still there after
    ``timeout`` seconds; reap it either way."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
