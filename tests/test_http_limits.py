"""The request head is bounded: its size (431) and the time to send it (408).

A real uvicorn process with our protocol, spoken to over raw sockets: an HTTP
client library would refuse to send most of these requests.
"""

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import suppress

import pytest

from taskman.processes import start_api, stop, wait_healthy

HEAD_TIMEOUT = 1.0
MAX_HEAD = 16384
MAX_CONNECTIONS = 40


@pytest.fixture(scope="module")
def address() -> Iterator[tuple[str, int]]:
    env = {
        **os.environ,
        "TASKMAN_MAX_HEADER_BYTES": str(MAX_HEAD),
        "TASKMAN_HEADER_TIMEOUT": str(HEAD_TIMEOUT),
        "TASKMAN_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    process, url = start_api("phase1_inprocess", env)
    try:
        wait_healthy(url, process)
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)
    finally:
        stop(process)


def _read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything until the server closes the connection."""
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(answer: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    # The server may answer and close before it has read all we send.
    with suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def test_a_header_larger_than_the_limit_is_answered_431_in_json_then_closed(
    address: tuple[str, int],
) -> None:
    with socket.create_connection(address) as sock:
        big = b"a" * 1_000_000
        _send_quietly(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + big)
        status, headers, body = _parse(_read_all(sock))
    assert status == 431
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    assert "header" in json.loads(body)["detail"]


def test_many_headers_that_add_up_past_the_limit_are_answered_431(
    address: tuple[str, int],
) -> None:
    many = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
    with socket.create_connection(address) as sock:
        _send_quietly(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        status, _, body = _parse(_read_all(sock))
    assert status == 431
    assert json.loads(body)["detail"]


def test_a_client_sending_its_head_one_byte_at_a_time_is_cut_with_408(
    address: tuple[str, int],
) -> None:
    started = time.monotonic()
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        with suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(100):
                sock.sendall(b"X")
                time.sleep(0.1)
        answer = _read_all(sock, timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed < HEAD_TIMEOUT + 2, f"held {elapsed:.1f} s"
    status, headers, body = _parse(answer)
    assert status == 408
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body)["detail"]


def test_a_connection_that_sends_nothing_is_closed_within_the_timeout(
    address: tuple[str, int],
) -> None:
    started = time.monotonic()
    with socket.create_connection(address) as sock:
        assert _read_all(sock, timeout=HEAD_TIMEOUT + 5) == b""
    assert time.monotonic() - started < HEAD_TIMEOUT + 2


def test_normal_requests_are_answered_on_one_connection_with_a_body(
    address: tuple[str, int],
) -> None:
    body = json.dumps({"type": "echo", "payload": {"value": "hi"}}).encode()
    requests = [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Fine: " + b"c" * 8000 + b"\r\n\r\n",
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    with socket.create_connection(address) as sock:
        for request in requests:
            sock.sendall(request)
            # Slower than the head timeout in all: each head is on time.
            time.sleep(HEAD_TIMEOUT * 0.6)
        answer = _read_all(sock)
    statuses = [int(part.split(b" ", 2)[1]) for part in answer.split(b"HTTP/1.1")[1:]]
    assert statuses == [200, 202, 200]


def test_a_connection_past_the_limit_is_answered_503_in_json(
    address: tuple[str, int],
) -> None:
    held = [socket.create_connection(address) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # until the server has accepted them all
        with socket.create_connection(address) as sock:
            _send_quietly(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = _parse(_read_all(sock))
        assert status == 503
        assert "connections" in json.loads(body)["detail"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _parse(_read_all(sock))[0] == 200
