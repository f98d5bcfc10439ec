"""TASKMAN_REDIS_MIN_REPLICAS in phases 2 and 3, against a real primary and
replica: 202 once the replica holds the task; 503 when it cannot confirm, with
the task wholly queued on the primary, and the same task again for a retry with
the Idempotency-Key. Sentinel settings are checked here too."""

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from common.settings import Settings
from phase2_queue.jobs import connect, url_options
from phase3_production.redis_client import connect_async
from taskman.processes import free_port, start, stop
from taskman.redis_server import EmbeddedRedis, redis_binary

PHASES = ["phase2_queue", "phase3_production"]


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("primary"))
    server.start()
    yield server
    server.stop()


def start_replica(primary: EmbeddedRedis, data_dir: Path) -> EmbeddedRedis:
    """A replica of ``primary``, once it has synced."""
    follow = ["--replicaof", "127.0.0.1", str(primary.port)]
    server = EmbeddedRedis(data_dir, extra_args=follow)
    server.start()
    connection = redis.Redis(port=server.port)
    deadline = time.monotonic() + 10
    while connection.info("replication")["master_link_status"] != "up":
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.05)
    return server


@pytest.fixture
def replica(primary: EmbeddedRedis, tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = start_replica(primary, tmp_path / "replica")
    yield server
    server.stop()


def app(phase: str, primary: EmbeddedRedis, wait_timeout: float) -> TestClient:
    module: ModuleType = __import__(phase)
    settings = Settings(
        redis_url=primary.url,
        queue_name=f"replicas-{phase}",
        redis_min_replicas=1,
        redis_wait_timeout=wait_timeout,
        rate_limit_submit="",
        rate_limit_read="",
    )
    return TestClient(module.create_app(settings))


@pytest.mark.parametrize("phase", PHASES)
def test_202_once_a_replica_holds_the_task(
    phase: str, primary: EmbeddedRedis, replica: EmbeddedRedis
) -> None:
    # Time enough for a replica on a busy machine: it answers well before.
    with app(phase, primary, wait_timeout=3) as client:
        response = client.post("/tasks", json={"type": "echo", "payload": {"value": 1}})
    assert response.status_code == 202, response.text
    # WAIT answered: the replica has the job already, no need to wait for it.
    assert redis.Redis(port=replica.port).exists(f"rq:job:{response.json()['id']}")


@pytest.mark.parametrize("phase", PHASES)
def test_503_without_a_replica_and_the_retry_gets_the_same_task(
    phase: str, primary: EmbeddedRedis, tmp_path: Path
) -> None:
    body = {"type": "echo", "payload": {"value": 2}}
    key = {"Idempotency-Key": f"no-replica-{phase}"}
    with app(phase, primary, wait_timeout=0.2) as client:
        response = client.post("/tasks", json=body, headers=key)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert "replica" in response.json()["detail"]
        # Not half-queued: the task is there whole, the key names it.
        connection = redis.Redis.from_url(primary.url)
        record = connection.get(f"taskman:idempotency:{key['Idempotency-Key']}")
        assert record is not None
        task_id = record.decode().split(" ")[1]
        assert connection.hget(f"rq:job:{task_id}", "status") == b"queued"
        assert task_id.encode() in connection.lrange(
            f"rq:queue:replicas-{phase}", 0, -1
        )
        # Once a replica holds it, the retry answers that same task.
        replica = start_replica(primary, tmp_path / "replica")
        try:
            deadline = time.monotonic() + 10
            while True:  # as a client does after a 503 (a busy machine may be slow)
                again = client.post("/tasks", json=body, headers=key)
                if again.status_code != 503 or time.monotonic() > deadline:
                    break
        finally:
            replica.stop()
    assert again.status_code == 200, again.text
    assert again.json()["id"] == task_id


def test_sentinels_come_with_their_master_name() -> None:
    with pytest.raises(ValidationError, match="together"):
        Settings(redis_sentinels="127.0.0.1:26379")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="host:port"):
        Settings(redis_sentinels="nowhere", redis_sentinel_master="m")  # type: ignore[arg-type]
    settings = Settings(
        redis_sentinels="127.0.0.1:26379, [::1]:26380",  # type: ignore[arg-type]
        redis_sentinel_master="m",
    )
    assert settings.redis_sentinels == ["127.0.0.1:26379", "[::1]:26380"]


def test_the_url_gives_credentials_and_tls_to_sentinel_clients() -> None:
    settings = Settings(
        redis_url="rediss://alice:secret@ignored:1/2?ssl_cert_reqs=none",
        redis_sentinels="127.0.0.1:26379",  # type: ignore[arg-type]
        redis_sentinel_master="m",
    )
    options = url_options(settings)
    assert options["username"] == "alice" and options["password"] == "secret"
    assert options["db"] == 2 and options["ssl"] is True
    assert options["ssl_cert_reqs"] == "none"
    assert "host" not in options and "port" not in options


def test_the_urls_password_reaches_the_primary_and_the_sentinel(
    tmp_path: Path,
) -> None:
    password = "s3cret"
    port = free_port()
    primary = EmbeddedRedis(
        tmp_path / "p",
        port=port,
        extra_args=["--requirepass", password],
        url=f"redis://:{password}@127.0.0.1:{port}/0",
    )
    primary.start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\nrequirepass {password}\n"
        f"sentinel monitor m 127.0.0.1 {primary.port} 1\n"
        f"sentinel auth-pass m {password}\n"
    )
    sentinel = start([redis_binary(), str(conf), "--sentinel"], own_session=True)
    settings = Settings(
        # Only the password and the database count; the host is the sentinels'.
        redis_url=f"redis://:{password}@unused-host/3",
        redis_sentinels=f"127.0.0.1:{port}",  # type: ignore[arg-type]
        redis_sentinel_master="m",
    )
    try:
        client = connect(settings)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.set("through-sentinel", "sync")
                break
            except redis.ConnectionError:  # the sentinel is starting
                assert time.monotonic() < deadline
                time.sleep(0.1)
        direct = redis.Redis(port=primary.port, password=password, db=3)
        assert direct.get("through-sentinel") == b"sync"

        async def asynchronously() -> None:
            aclient = connect_async(settings)
            await aclient.set("through-sentinel", "async")
            await aclient.aclose()

        asyncio.run(asynchronously())
        assert direct.get("through-sentinel") == b"async"
        client.close()
    finally:
        stop(sentinel)
        primary.stop()


@pytest.mark.parametrize("phase", PHASES)
def test_a_repeat_is_answered_only_once_a_replica_holds_the_first(
    phase: str, primary: EmbeddedRedis, replica: EmbeddedRedis
) -> None:
    """A 200 for a repeated Idempotency-Key means what a 202 means: replicated.
    The repeat comes from a fresh API (new connections, which have written
    nothing, so a bare WAIT would count the stalled replica as holding it)."""
    body = {"type": "echo", "payload": {"value": 3}}
    key = {"Idempotency-Key": f"stalled-{phase}"}
    assert replica.process is not None
    os.kill(replica.process.pid, signal.SIGSTOP)  # connected, acknowledging nothing
    try:
        with app(phase, primary, wait_timeout=0.2) as client:
            first = client.post("/tasks", json=body, headers=key)
        assert first.status_code == 503, first.text
        with app(phase, primary, wait_timeout=0.2) as client:
            again = client.post("/tasks", json=body, headers=key)
        assert again.status_code == 503, again.text
    finally:
        os.kill(replica.process.pid, signal.SIGCONT)
    with app(phase, primary, wait_timeout=3) as client:
        repeat = client.post("/tasks", json=body, headers=key)
    assert repeat.status_code == 200, repeat.text
    assert redis.Redis(port=replica.port).exists(f"rq:job:{repeat.json()['id']}")
