"""A delay line for TCP: a relay in front of Redis that holds each reply for a set
time before passing it on, so that every round trip through it takes that much
longer. The bench's round-trip figures use it (taskman/bench/rtt.py).

Why not ``tc qdisc ... netem delay``: the kernels this project runs on (a microVM's,
built without modules) have no netem, nor any qdisc that delays. A relay works on
every kernel, so figures from different machines compare; its own cost shows in
the bench's 0 ms row, measured through it too, beside a row without it.

The whole delay is on the reply side (upstream to client): a round trip is one
request and one reply, so one wait per round trip, and one timer error. Replies
are held in order, not one at a time: a pipeline's commands are in flight
together, as on a real link. A thread per direction per connection (RQ and the
API open a few each); ``time.sleep`` is precise to tens of microseconds, where an
event loop's timers round up to milliseconds.

    python -m taskman.delayline LISTEN_HOST:PORT UPSTREAM_HOST:PORT --control PATH

The delay starts at 0; a line "5\\n" on the Unix socket ``PATH`` sets it to 5 ms
(answered "ok"). A Unix socket with a path is not bound to a network namespace:
the bench reaches it from anywhere.
"""

import argparse
import ctypes
import queue
import socket
import threading
import time
from pathlib import Path

_CHUNK = 65536
_PR_SET_TIMERSLACK = 29


class Relay:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.delay = 0.0  # seconds

    def serve(self, listener: socket.socket) -> None:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            # Each write goes out at once: Nagle would hold pipelined writes back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        held: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
        ended = threading.Semaphore(0)

        def close_when_both_ended() -> None:
            ended.acquire()
            ended.acquire()
            client.close()
            upstream.close()

        for target in (
            lambda: _pump(client, upstream, ended),
            lambda: self._hold(upstream, held),
            lambda: _release(held, client, ended),
            close_when_both_ended,
        ):
            threading.Thread(target=target, daemon=True).start()

    def _hold(
        self, source: socket.socket, held: "queue.SimpleQueue[tuple[float, bytes]]"
    ) -> None:
        try:
            while data := source.recv(_CHUNK):
                held.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        held.put((0.0, b""))  # the end


def _pump(
    source: socket.socket, sink: socket.socket, ended: threading.Semaphore
) -> None:
    """Client to upstream, as it comes."""
    try:
        while data := source.recv(_CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    _shut(sink)
    ended.release()


def _release(
    held: "queue.SimpleQueue[tuple[float, bytes]]",
    sink: socket.socket,
    ended: threading.Semaphore,
) -> None:
    """Upstream to client, each chunk when its time has come."""
    try:
        while True:
            due, data = held.get()
            if not data:
                break
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            sink.sendall(data)
    except OSError:
        pass
    _shut(sink)
    ended.release()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        sock.close()


def _control(relay: Relay, path: Path) -> None:
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    while True:
        conn, _ = server.accept()
        with conn:
            line = conn.makefile().readline()
            try:
                relay.delay = max(0.0, float(line)) / 1000
                conn.sendall(b"ok\n")
            except ValueError:
                conn.sendall(b"not a number of milliseconds\n")


def set_delay(control: Path, milliseconds: float, timeout: float = 10) -> None:
    """Set a running delay line's delay (ms); waits for it to be up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(control))
                sock.sendall(f"{milliseconds}\n".encode())
                answer = sock.makefile().readline().strip()
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no delay line at {control}") from None
            time.sleep(0.05)
            continue
        if answer != "ok":
            raise ValueError(answer)
        return


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listen", type=_address)
    parser.add_argument("upstream", type=_address)
    parser.add_argument("--control", type=Path, required=True)
    args = parser.parse_args()
    # Linux wakes a sleeper up to 50 us late by default (timer slack): ask for 1 ns.
    ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    relay = Relay(args.upstream)
    listener = socket.create_server(args.listen, backlog=128)
    threading.Thread(target=_control, args=(relay, args.control), daemon=True).start()
    relay.serve(listener)


if __name__ == "__main__":
    main()
