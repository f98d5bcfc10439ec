"""The HTTP client of the ``taskman`` commands that talk to a running API.

Written once for ``submit``, ``status``, ``list``, ``cancel`` and ``watch``: every
way a request can go wrong (no server, a bad URL, a timeout, an answer that is not
JSON, an error status) becomes one :class:`ClientError` with a one-line message,
so a command prints that line and exits 2 instead of showing a traceback.
"""

import json
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self

import httpx

FINISHED = ("succeeded", "failed", "canceled")

# An event stream says something (a change, or a keepalive comment) at least
# every 15 s (common/events.py): twice that in silence means it is dead.
STREAM_READ_TIMEOUT = 30.0
RECONNECTS = 5
RECONNECT_PAUSE = 1.0


class ClientError(Exception):
    """A request that did not get the answer it asked for; ``str()`` is one line."""


class _StreamBroke(Exception):
    """An event stream that began and broke off: worth opening again."""


class TaskClient:
    """A blocking client of the task API at ``url``; use it as a context manager."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as error:
            raise ClientError(f"bad URL {url!r}: {error}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ClientError(
                f"bad URL {url!r}: give http://host:port or https://host:port"
            )
        self.url = url
        self.timeout = timeout
        self._http = httpx.Client(base_url=parsed, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._http.close()

    # The API's routes, in docs/contract.md's order.

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /tasks``: the task as queued."""
        return self._json("POST", "/tasks", json=body)

    def page(
        self,
        status: str | None = None,
        type: str | None = None,  # noqa: A002
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """``GET /tasks``: one page, ``{"tasks": [...], "next_cursor": ...}``."""
        given = {"status": status, "type": type, "limit": limit, "cursor": cursor}
        params = {name: value for name, value in given.items() if value is not None}
        return self._json("GET", "/tasks", params=params)

    def tasks(
        self,
        status: str | None,
        type: str | None,  # noqa: A002
        limit: int,
        cursor: str | None = None,
        every_page: bool = False,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of tasks, or with ``every_page`` all of them, page after page;
        and the cursor of the page after (None: there is none)."""
        found: list[dict[str, Any]] = []
        while True:
            page = self.page(status, type, limit, cursor)
            found += page["tasks"]
            cursor = page.get("next_cursor")
            if cursor is None or not every_page:
                return found, cursor

    def get(self, task_id: str) -> dict[str, Any]:
        """``GET /tasks/{id}``."""
        return self._json("GET", f"/tasks/{task_id}")

    def events(self, task_id: str) -> Iterator[dict[str, Any]]:
        """``GET /tasks/{id}/events``: the task at once, then at each change,
        ending with the event that shows it finished.

        A stream that breaks off after it began (its ``error`` event: Redis did
        not answer; or a dropped connection) is opened again, as the contract
        asks, up to :data:`RECONNECTS` times in a row, a second apart.
        """
        failures = 0
        while True:
            try:
                for task in self._stream(task_id):
                    failures = 0
                    yield task
                    if task.get("status") in FINISHED:
                        return
                problem = f"{self.url} closed the event stream before the task finished"
            except _StreamBroke as broke:
                problem = str(broke)
            failures += 1
            if failures > RECONNECTS:
                raise ClientError(problem)
            time.sleep(RECONNECT_PAUSE)

    def _stream(self, task_id: str) -> Iterator[dict[str, Any]]:
        """One connection to the event stream: its tasks, until it ends."""
        timeout = httpx.Timeout(self.timeout, read=STREAM_READ_TIMEOUT)
        began = False
        try:
            with self._http.stream(
                "GET", f"/tasks/{task_id}/events", timeout=timeout
            ) as response:
                if response.is_error:
                    response.read()
                    raise ClientError(self._refusal(response))
                for event, data in _server_sent_events(response.iter_lines()):
                    if event == "task":
                        began = True
                        yield _decoded(data, response)
                    elif event == "gone":  # the task expired: nothing to wait for
                        detail = _decoded(data, response).get("detail", data)
                        raise ClientError(f"{self.url}: {detail}")
                    elif event == "error":
                        detail = _decoded(data, response).get("detail", data)
                        raise _StreamBroke(f"{self.url}: {detail}")
        except httpx.HTTPError as error:
            if not began:  # nothing answers there: say so at once
                raise ClientError(self._failure(error)) from None
            raise _StreamBroke(self._failure(error)) from None

    def cancel(self, task_id: str) -> dict[str, Any]:
        """``DELETE /tasks/{id}``: the task, now canceled."""
        return self._json("DELETE", f"/tasks/{task_id}")

    # What they share.

    def _json(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **options)
        except httpx.HTTPError as error:
            raise ClientError(self._failure(error)) from None
        if response.is_error:
            raise ClientError(self._refusal(response))
        return _decoded(response.text, response)

    def _failure(self, error: httpx.HTTPError) -> str:
        """One line for a request that got no answer."""
        if isinstance(error, httpx.ConnectError):
            return f"cannot reach {self.url} ({_reason(error)}): is `taskman serve` running?"
        if isinstance(error, httpx.TimeoutException):
            return f"{self.url} did not answer within {self.timeout:g} s"
        if isinstance(error, httpx.RemoteProtocolError):
            return f"{self.url} closed the connection mid-answer ({_reason(error)})"
        if isinstance(error, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return f"bad URL {self.url!r}: {_reason(error)}"
        return f"{self.url}: {type(error).__name__}: {_reason(error)}"

    def _refusal(self, response: httpx.Response) -> str:
        """One line for an error answer: its status and the API's ``detail``."""
        where = f"{response.request.method} {response.request.url.path}"
        try:
            detail = response.json()["detail"]
        except (ValueError, KeyError, TypeError):
            return f"{where}: HTTP {response.status_code}, not the API's JSON: {_start(response.text)}"
        if isinstance(detail, list):  # a 422: each problem as "where: what"
            detail = "; ".join(_problem(item) for item in detail)
        return f"{where}: HTTP {response.status_code}: {detail}"


def _server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream, as the WHATWG spec reads it."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:  # a blank line ends an event
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):  # a comment: the keepalive
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)


def _decoded(text: str, response: httpx.Response) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ClientError(
            f"{response.request.url} answered HTTP {response.status_code} with "
            f"something that is not the API's JSON: {_start(text)}"
        )
    return value


def _problem(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    where = ".".join(str(part) for part in item.get("loc") or ())
    return f"{where}: {item.get('msg')}" if where else str(item.get("msg"))


def _reason(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else "no detail"


def _start(text: str, length: int = 80) -> str:
    """The first line of a body, cut short: enough to recognise it."""
    first = text.strip().splitlines()[0] if text.strip() else "(an empty body)"
    return first if len(first) <= length else first[:length] + "…"
