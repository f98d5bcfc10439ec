"""Hosts on one machine: Linux network namespaces joined by a switch, for the tests
and the bench that need a network that fails (a partition) or is slow (round trips).

Each host is a namespace with one veth into a "switch" namespace that holds a bridge.
No namespace has a route past the switch, and the hosts' addresses (``SUBNET``) are
reached only from inside. The machine's own namespace gets one thing: an
"unreachable" route to ``SUBNET`` while a run lasts, so that a socket opened outside
every host by mistake fails at once instead of going out by the default route. A thread
enters a host with :meth:`Network.inside`; a process started there inherits it, as
with ``ip netns exec``. Partitioning a host is taking its port on the switch down:
its own link stays up, and what it sends is silently lost, as when a cable or a
switch fails (no reset, no error: only timeouts tell).

Namespaces are named ``taskman-<pid>-<n>-<role>``: runs never collide, and a run
deletes what a killed one left (its pid gone). Needs root and ``ip`` (iproute2).
"""

import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from taskman import processes
from taskman.processes import Output, Process, api_command, wait_healthy
from taskman.redis_server import EmbeddedRedis

# Private addresses that exist only inside this run's namespaces.
SUBNET = "10.213.0"
PREFIX = "taskman-"
_CLONE_NEWNET = 0x40000000
_RUN = Path("/run/netns")
_GUARD = ("route", "add", "unreachable", f"{SUBNET}.0/24")
_counter = itertools.count()
# The networks of this process that are up, under the guard route while any is.
_networks = 0
_guard_lock = threading.Lock()


class NetnsUnavailable(RuntimeError):
    """This machine (or user) cannot make network namespaces."""


def unavailable() -> str | None:
    """Why this machine cannot make network namespaces, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:  # and what a network is made of: a bridge, a veth pair
        for link in (("br0", "type", "bridge"), ("v0", "type", "veth")):
            made = _ip("-n", probe, "link", "add", *link, check=False)
            if made.returncode != 0:
                return f"no {link[-1]} links: {made.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Host:
    role: str
    namespace: str
    address: str
    port: str  # its veth's name on the switch


class Network:
    """``with Network(["redis", "api", "w1"]) as net:`` one host per role, all
    joined by a switch; torn down on exit (even after an error), with whatever
    still runs inside."""

    def __init__(self, roles: Sequence[str]) -> None:
        if len(set(roles)) != len(roles) or len(roles) > 200:
            raise ValueError(f"roles must be distinct, at most 200: {roles}")
        run = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.switch = f"{run}-switch"
        self._guarded = False
        self.hosts = {
            role: Host(role, f"{run}-{role}", f"{SUBNET}.{10 + i}", f"p{i}")
            for i, role in enumerate(roles)
        }

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    def create(self) -> None:
        global _networks
        with _guard_lock:
            _sweep()
            if _networks == 0:
                # One guard per process, its pid as the metric: another's is another
                # route, and a sweep tells a dead process's by it.
                _ip(*_GUARD, "metric", str(os.getpid()))
            _networks += 1
            self._guarded = True
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "dev", "br0", "up")
        for host in self.hosts.values():
            ns = host.namespace
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "dev", "lo", "up")
            # Made in place: eth0 in the host, its peer on the switch.
            _ip(
                *("-n", ns, "link", "add", "eth0", "type", "veth"),
                *("peer", "name", host.port, "netns", sw),
            )
            _ip("-n", ns, "link", "set", "dev", "eth0", "up")
            _ip("-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", sw, "link", "set", "dev", host.port, "master", "br0")
            _ip("-n", sw, "link", "set", "dev", host.port, "up")

    def delete(self) -> None:
        """Kill what runs in our namespaces (nothing else can), delete them."""
        global _networks
        for ns in [h.namespace for h in self.hosts.values()] + [self.switch]:
            _delete_namespace(ns)
        with _guard_lock:
            if self._guarded:
                self._guarded = False
                _networks -= 1
                if _networks == 0:
                    _ip("route", "del", *_GUARD[2:], "metric", str(os.getpid()))

    def __enter__(self) -> "Network":
        try:
            self.create()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    # --- using it

    @contextmanager
    def inside(self, role: str) -> Iterator[Host]:
        """Run the enclosed code's sockets, and the processes it starts, on host
        ``role``: this thread enters its namespace, and comes back on exit."""
        host = self.hosts[role]
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(_RUN / host.namespace)
            try:
                yield host
            finally:
                _setns_fd(home)
        finally:
            os.close(home)

    def start(
        self,
        role: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log: Output = subprocess.DEVNULL,
    ) -> Process:
        """:func:`taskman.processes.start` on host ``role``."""
        with self.inside(role):
            return processes.start(argv, env=env, log=log)

    def partition(self, role: str) -> None:
        """Cut ``role`` off from every other host: its switch port goes down."""
        _ip("-n", self.switch, "link", "set", "dev", self.hosts[role].port, "down")

    def heal(self, role: str) -> None:
        _ip("-n", self.switch, "link", "set", "dev", self.hosts[role].port, "up")

    # --- the project's servers on a host

    def redis(self, role: str, data_dir: Path, port: int = 6379) -> EmbeddedRedis:
        """A started redis-server on host ``role``, bound to its address only."""
        address = self.hosts[role].address
        server = EmbeddedRedis(
            data_dir,
            port=port,
            # Protected mode refuses clients on other hosts unless a password is
            # set; these hosts exist only inside this run.
            extra_args=["--bind", address, "--protected-mode", "no"],
            url=f"redis://{address}:{port}/0",
        )
        with self.inside(role):
            server.start()
        return server

    def api(
        self,
        role: str,
        module: str,
        env: dict[str, str],
        *,
        port: int = 8000,
        log: Output = subprocess.DEVNULL,
    ) -> tuple[Process, str]:
        """``module``'s app under uvicorn on host ``role``, not yet healthy (see
        :meth:`wait_healthy`); the process and its URL."""
        address = self.hosts[role].address
        argv = [*api_command(module, port), "--host", address]  # not 127.0.0.1
        return self.start(role, argv, env=env, log=log), f"http://{address}:{port}"

    def wait_healthy(self, role: str, url: str, process: Process) -> None:
        """:func:`taskman.processes.wait_healthy`, asked from host ``role``."""
        with self.inside(role):
            wait_healthy(url, process)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _setns(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _setns_fd(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns_fd(fd: int) -> None:
    # os.setns is Python 3.12's; libc's is the same call.
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def _delete_namespace(ns: str) -> None:
    if not (_RUN / ns).exists():
        return
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        processes.send(int(pid), signal.SIGKILL)
    for pid in pids:  # ours to reap if they are our children
        with suppress(ChildProcessError, OSError):
            os.waitpid(int(pid), os.WNOHANG)
    _ip("netns", "del", ns, check=False)


def _sweep() -> None:
    """Delete the namespaces and guards of runs whose process is gone (killed)."""
    for path in _RUN.glob(f"{PREFIX}*") if _RUN.is_dir() else []:
        pid = path.name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not processes.alive(int(pid)):
            _delete_namespace(path.name)
    for line in _ip("route", "show", f"{SUBNET}.0/24", check=False).stdout.splitlines():
        words = line.split()  # "unreachable 10.213.0.0/24 metric 1234"
        if words[:1] == ["unreachable"] and "metric" in words:
            pid = words[words.index("metric") + 1]
            if not processes.alive(int(pid)):
                _ip("route", "del", *words[:2], "metric", pid, check=False)


__all__ = ["SUBNET", "Host", "NetnsUnavailable", "Network", "unavailable"]
