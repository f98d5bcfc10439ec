"""taskman/netns.py: hosts that reach each other and nothing else, a partition
that loses packets, and a teardown that leaves nothing, even after an error."""

import errno
import os
import socket
import subprocess
import sys

import pytest

from taskman import netns
from taskman.netns import Network
from taskman.processes import alive

REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(
    REASON is not None, reason=f"cannot make network namespaces here: {REASON}"
)


def _ours() -> tuple[str, str]:
    """Our namespaces, and our guard route, as `ip` lists them."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    found = [n for n in names.stdout.split() if n.startswith(f"taskman-{os.getpid()}-")]
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    guard = [r for r in routes.splitlines() if f"metric {os.getpid()}" in r]
    return " ".join(found), " ".join(guard)


def test_hosts_reach_each_other_only_from_inside_and_a_partition_loses_packets() -> (
    None
):
    with Network(["a", "b"]) as net:
        address = (net["b"].address, 7000)
        with net.inside("b"):
            server = socket.create_server(address)
        with server:
            with net.inside("a"):
                client = socket.create_connection(address, 2)
            with client, server.accept()[0] as peer:
                client.sendall(b"ping")
                assert peer.recv(4) == b"ping"
            # Outside every host: refused at once by the guard, never sent out.
            with pytest.raises(OSError) as outside:
                socket.create_connection(address, 2)
            assert outside.value.errno == errno.EHOSTUNREACH
            net.partition("a")
            with net.inside("a"), pytest.raises(TimeoutError):
                socket.create_connection(address, 1)
            net.heal("a")
            with net.inside("a"):
                socket.create_connection(address, 2).close()


def test_teardown_after_an_error_kills_what_ran_inside_and_deletes_everything() -> None:
    with pytest.raises(RuntimeError, match="boom"), Network(["a"]) as net:
        process = net.start("a", [sys.executable, "-c", "import time; time.sleep(60)"])
        assert _ours() != ("", "")
        raise RuntimeError("boom")
    process.wait(timeout=5)
    assert not alive(process.pid)
    assert _ours() == ("", "")
