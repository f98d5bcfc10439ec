"""Child processes that cannot outlive us."""

import ctypes
import os
import signal
import stat

_PR_SET_PDEATHSIG = 1


def die_with_parent(
    sig: signal.Signals = signal.SIGKILL, parent: int | None = None
) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies, even by
    SIGKILL. Call it in the child. Elsewhere it does nothing: there the parent's
    own shutdown has to reap its children.

    Linux sends nothing if the parent died before this call, and a spawned child
    makes it only after its start-up (a second or so of imports). Given the
    ``parent`` pid the child was started by, a child whose parent is already gone
    (it has been reparented) gets ``sig`` at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


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
