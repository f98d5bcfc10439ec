"""The ``taskman`` client commands, run as a person runs them: the installed
command against a real ``taskman serve`` (phase 1: in-process, no Redis), or
against a port where nothing, or something else, answers.

Exit codes (docs/contract.md, "Running it"): 0 done, 1 the task ended failed or
canceled, 2 the command could not do what it was asked (no server, a bad URL, a
timeout, an answer that is not the API's JSON, an error status, bad arguments),
always as one line on stderr, never a traceback.
"""

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import (
    BaseHTTPRequestHandler,
    SimpleHTTPRequestHandler,
    ThreadingHTTPServer,
)
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from taskman.redis_server import free_port
from tests.processes import BIN, stop, taskman, wait_http

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``taskman serve --phase 1``: its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("cli") / "serve.log"
    server = taskman(
        *("serve", "--phase", "1", "--port", str(port)),
        env={"TASKMAN_SHUTDOWN_TIMEOUT": "1", "TASKMAN_RETRY_BACKOFF": "0"},
        log=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", process=server)
        yield url
    finally:
        stop(server, timeout=30)


def run(*args: str, url: str | None = None, timeout: float = 60) -> Any:
    """``taskman ARGS [--url URL]``, finished: its exit code and output."""
    argv = [str(BIN / "taskman"), *args, *(["--url", url] if url else [])]
    # A wide terminal for rich: the table's columns are not squeezed.
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env
    )


def refused(done: Any) -> str:
    """The one line a command printed on stderr on its way to exit 2."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    line: str = lines[0]
    return line


def submitted(api: str, type: str, payload: dict[str, Any], *more: str) -> Any:  # noqa: A002
    done = run("submit", type, "--payload", json.dumps(payload), *more, url=api)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- the commands, against a real server


def test_submit_prints_the_queued_task_and_status_reads_it_back(api: str) -> None:
    task = submitted(api, "echo", {"value": "hi"}, "--priority", "high")
    assert task["status"] in ("queued", "running", "succeeded")
    assert task["priority"] == "high"
    done = run("status", task["id"], url=api)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == task["id"]


def test_submit_wait_shows_live_status_and_exits_0_when_it_succeeds(api: str) -> None:
    done = run(
        *("submit", "primes", "--payload", '{"limit": 2000000}', "--wait"), url=api
    )
    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)  # stdout is the finished task, alone
    assert task["status"] == "succeeded"
    assert task["result"] == {"count": 148933}
    # The live view (stderr) followed the event stream: each status once.
    assert f"{task['id']} succeeded" in done.stderr
    assert done.stderr.index("running") < done.stderr.index("succeeded")


def test_submit_wait_exits_1_when_the_task_fails(api: str) -> None:
    done = run(
        *("submit", "fail", "--payload", '{"message": "boom"}', "--max-retries", "0"),
        "--wait",
        url=api,
    )
    assert done.returncode == 1, done.stderr
    task = json.loads(done.stdout)
    assert task["status"] == "failed"
    assert "RuntimeError: boom" in done.stderr


def test_cancel_cancels_and_a_second_cancel_is_one_line_and_exit_2(api: str) -> None:
    task = submitted(api, "sleep", {"seconds": 30})
    done = run("cancel", task["id"], url=api)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "canceled"
    again = refused(run("cancel", task["id"], url=api))
    assert again.endswith("HTTP 409: task is already canceled"), again


def test_watch_follows_a_task_to_its_cancel_and_exits_1(api: str) -> None:
    task = submitted(api, "sleep", {"seconds": 30})
    argv = [str(BIN / "taskman"), "watch", task["id"], "--url", api]
    watcher = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Its first line: it follows the stream, and the task is not over.
        assert watcher.stderr is not None
        first = watcher.stderr.readline()
        assert first.startswith(f"{task['id']} "), first
        assert "canceled" not in first
        httpx.delete(f"{api}/tasks/{task['id']}").raise_for_status()
        out, err = watcher.communicate(timeout=10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 1, err
    assert json.loads(out)["status"] == "canceled"
    assert f"{task['id']} canceled" in first + err


def test_watch_of_a_finished_task_prints_it_at_once(api: str) -> None:
    task = submitted(api, "echo", {"value": 7}, "--wait")
    done = run("watch", task["id"], url=api, timeout=10)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 7


def test_list_shows_a_table_and_all_follows_every_page(api: str) -> None:
    ids = [submitted(api, "flaky", {"fail_times": 0})["id"] for _ in range(5)]
    first = run("list", "--type", "flaky", "--limit", "2", url=api)
    assert first.returncode == 0, first.stderr
    assert "taskman list --cursor" in first.stdout  # there is more
    # Newest first: the last two submitted.
    assert ids[4] in first.stdout and ids[3] in first.stdout
    assert ids[0] not in first.stdout
    every = run("list", "--type", "flaky", "--limit", "2", "--all", url=api)
    assert every.returncode == 0, every.stderr
    assert all(task_id in every.stdout for task_id in ids)
    assert "--cursor" not in every.stdout
    rows = [line for line in every.stdout.splitlines() if "flaky" in line]
    assert [next(i for i in ids if i in row) for row in rows] == ids[::-1]


def test_list_with_a_bad_filter_is_the_apis_422_in_one_line(api: str) -> None:
    line = refused(run("list", "--status", "lost", url=api))
    assert "HTTP 422" in line and "query.status" in line, line


def test_error_answers_are_one_line_and_exit_2(api: str) -> None:
    line = refused(run("status", "0123456789abcdef0123456789abcdef", url=api))
    assert line.endswith("HTTP 404: task not found"), line
    line = refused(run("submit", "primes", "--payload", '{"limit": 1}', url=api))
    assert "HTTP 422" in line and "payload.limit" in line, line
    line = refused(run("submit", "nope", url=api))
    assert "unknown task type" in line, line


def test_a_payload_that_is_not_json_is_a_usage_error(api: str) -> None:
    done = run("submit", "echo", "--payload", "{value", url=api)
    assert done.returncode == 2
    assert "not JSON" in done.stderr and "Traceback" not in done.stderr


# --- the command with no API to talk to


def test_no_server_there_is_one_line_and_exit_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status", "0" * 32], ["list"], ["cancel", "0" * 32], ["watch", "x"]):
        line = refused(run(*args, url=url))
        assert line == (
            f"taskman: cannot reach {url} ([Errno 111] Connection refused): "
            "is `taskman serve` running?"
        ), line


@pytest.mark.parametrize(
    "url", ["localhost:8000", "ftp://127.0.0.1", "http://[::1", "http://", "nope"]
)
def test_a_bad_url_is_one_line_and_exit_2(url: str) -> None:
    line = refused(run("submit", "echo", "--payload", '{"value": 1}', url=url))
    assert line.startswith(f"taskman: bad URL {url!r}"), line


def test_a_server_that_never_answers_times_out_in_one_line() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # connections are accepted by the kernel, never answered
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        line = refused(run("status", "0" * 32, "--timeout", "0.5", url=url))
        assert time.monotonic() - started < 10
    assert line == f"taskman: {url} did not answer within 0.5 s", line


@pytest.fixture
def not_the_api(tmp_path: Path) -> Iterator[str]:
    """A web server that is not ours: GET /tasks is a text file, anything else
    its HTML 404 page."""
    (tmp_path / "tasks").write_text("hello, I am a file\n")
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_that_is_not_json_is_one_line_and_exit_2(not_the_api: str) -> None:
    line = refused(run("list", url=not_the_api))
    assert "HTTP 200 with something that is not the API's JSON" in line, line
    assert "hello, I am a file" in line
    line = refused(run("status", "0" * 32, url=not_the_api))
    assert "HTTP 404, not the API's JSON" in line, line


# --- make run


def test_make_run_serves_on_the_port_given(tmp_path: Path) -> None:
    port = free_port()
    # -o: take the venv as set up (the suite runs in it), install nothing.
    argv = ["make", "-o", ".venv/bin/taskman", "run", "PHASE=1", f"PORT={port}"]
    make = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # make and its taskman: one group to stop
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process=make)
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["phase"] == 1
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(timeout=30)


# --- an event stream that breaks off


class _Flaky(BaseHTTPRequestHandler):
    """Serves one task's event stream: the first connection says the task is
    running, then that Redis did not answer (the API's ``error`` event); the
    next one that the task succeeded."""

    protocol_version = "HTTP/1.0"  # the stream ends as the connection closes
    opened: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.opened.append(self.path)
        task = {"id": "f" * 32, "type": "echo", "status": "running", "attempts": 1}
        events = [("task", task)]
        if len(self.opened) == 1:
            events.append(("error", {"detail": "the queue (Redis) is unreachable"}))
        else:
            events.append(("task", {**task, "status": "succeeded", "result": 1}))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for number, (name, data) in enumerate(events, 1):
            text = f"id: {number}\nevent: {name}\ndata: {json.dumps(data)}\n\n"
            self.wfile.write(text.encode())

    def log_message(self, *args: Any) -> None:
        pass


def test_watch_opens_a_broken_off_stream_again() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        done = run("watch", "f" * 32, url=url, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "succeeded"
    assert _Flaky.opened == [f"/tasks/{'f' * 32}/events"] * 2
    assert "Traceback" not in done.stderr
