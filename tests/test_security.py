"""The security review of SECURITY.md, one protection per test, each shown to fail
without it: Redis with a password, an ACL user or TLS everywhere; JSON, never
pickle; only registered task functions run; the dashboard's gate on every route;
rate-limit keys a client cannot choose; errors that leak nothing."""

import base64
import json
import logging
import os
import pickle
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from rq import Callback, Queue
from rq.serializers import DefaultSerializer, JSONSerializer
from rq.webhook import Webhook

import phase2_queue
import phase3_production
from common.settings import Settings
from common.tasks import describe_error
from phase2_queue.jobs import task_queue
from phase2_queue.worker import run_worker
from taskman.processes import taskman_command
from taskman.redis_server import EmbeddedRedis, free_port
from tests.conftest import wait_for
from tests.processes import drain, stop, taskman, wait_http
from tests.test_dashboard import RULES, concrete
from tests.test_ratelimit import UNKNOWN_TASK, limited_app

# Distinctive, so that finding one in an answer or a log is never a coincidence.
ADMIN_PASSWORD = "admin-Zq8v-secret"
ALICE_PASSWORD = "alice-Xk3d-secret"
BOB_PASSWORD = "bob-Wm5t-secret"
DASHBOARD_PASSWORD = "dashboard-Hy7c-secret"
AUTH = {
    "Authorization": "Basic "
    + base64.b64encode(f"admin:{DASHBOARD_PASSWORD}".encode()).decode()
}
PHASES = [
    pytest.param(phase2_queue, id="phase2"),
    pytest.param(phase3_production, id="phase3"),
]


# --- Redis servers of this module's own: an ACL user and a password, and TLS


@dataclass(frozen=True)
class SecureRedis:
    url: str  # how our services must reach it
    unprotected_url: str  # the same server without the credentials or TLS
    port: int


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA and a server certificate it signed, for 127.0.0.1."""
    where = tmp_path_factory.mktemp("tls")
    ca, ca_key = where / "ca.crt", where / "ca.key"
    cert, key, request = where / "server.crt", where / "server.key", where / "req"
    (where / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for command in (
        f"req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca "
        f"-keyout {ca_key} -out {ca}",
        f"req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout {key} -out {request}",
        f"x509 -req -days 1 -in {request} -CA {ca} -CAkey {ca_key} -CAcreateserial "
        f"-extfile {where / 'san.cnf'} -out {cert}",
    ):
        subprocess.run(["openssl", *command.split()], check=True, capture_output=True)
    return Certificates(ca, cert, key)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    """requirepass for the default user; alice may do all that our services do
    (SECURITY.md's ACL: nothing @dangerous, e.g. CONFIG or MODULE), bob neither
    Lua nor RPUSH."""
    port = free_port()
    everything = "on ~* &* +@all -@dangerous"
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("acl"),
        port,
        extra_args=(
            f"--requirepass {ADMIN_PASSWORD} "
            f"--user alice >{ALICE_PASSWORD} {everything} "
            f"--user bob >{BOB_PASSWORD} {everything} -@scripting -rpush"
        ).split(),
        url=f"redis://alice:{ALICE_PASSWORD}@127.0.0.1:{port}/0",
    )
    server.start()
    yield SecureRedis(server.url, f"redis://127.0.0.1:{port}/0", port)
    server.stop()


@pytest.fixture(scope="module")
def tls_redis(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[SecureRedis]:
    """TLS only (no plain port); clients check the server against our CA."""
    port = free_port()
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("tls-redis"),
        port,
        extra_args=(
            f"--port 0 --tls-port {port} --tls-cert-file {certificates.cert} "
            f"--tls-key-file {certificates.key} --tls-ca-cert-file {certificates.ca} "
            "--tls-auth-clients no"
        ).split(),
        url=f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={quote(str(certificates.ca))}",
    )
    server.start()
    # Without our CA the certificate is not trusted: TLS is really checked.
    yield SecureRedis(server.url, f"rediss://127.0.0.1:{port}/0", port)
    server.stop()


@pytest.fixture(params=["acl", "tls"])
def secure_redis(request: pytest.FixtureRequest) -> SecureRedis:
    found: SecureRedis = request.getfixturevalue(f"{request.param}_redis")
    return found


def start_worker(url: str, queue: str, log: Path, **env: str) -> Any:
    return taskman(
        "worker",
        "--phase",
        "3",
        env={"TASKMAN_REDIS_URL": url, "TASKMAN_QUEUE_NAME": queue, **env},
        log=log,
    )


def connect(url: str) -> Any:
    """A sync client (typed Any: redis-py's sync/async unions get in the way)."""
    return redis.Redis.from_url(url)


def new_queue() -> str:
    return f"s{uuid.uuid4().hex[:8]}"


# --- 1. Redis with a password, an ACL user or TLS, end to end


def test_the_secure_redis_servers_refuse_clients_without_credentials_or_tls(
    secure_redis: SecureRedis,
) -> None:
    # The control for the tests below: without what the URL carries, no access.
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(secure_redis.unprotected_url).ping()
    client = redis.Redis.from_url(secure_redis.url)
    assert client.ping()
    if "alice" in secure_redis.url:
        # Our services' user cannot turn Redis into a file writer on its host.
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.config_set("dir", "/tmp")


def test_a_task_runs_through_api_worker_limiter_and_dashboard_on_a_secure_redis(
    secure_redis: SecureRedis, tmp_path: Path
) -> None:
    queue = new_queue()
    worker = start_worker(secure_redis.url, queue, tmp_path / "worker.log")
    settings = Settings(
        redis_url=secure_redis.url,
        queue_name=queue,
        dashboard_password=DASHBOARD_PASSWORD,
        # A limiter that cannot reach Redis would answer 503, not let requests by.
        rate_limit_fail_mode="closed",
        # A delayed retry waits in RQ's scheduler, which opens its own connection.
        retry_backoff=[0.2],
        retry_jitter=0,
    )
    try:
        with TestClient(phase2_queue.create_app(settings)) as client:
            response = client.post(
                "/tasks", json={"type": "echo", "payload": {"value": 1}}
            )
            assert response.status_code == 202, response.text
            assert wait_for(client, response.json()["id"])["result"] == 1
            assert client.get("/health").json()["redis"] == "ok"
        with TestClient(phase3_production.create_app(settings)) as client:
            body = {"type": "flaky", "payload": {"fail_times": 1}, "max_retries": 1}
            response = client.post("/tasks", json=body)
            assert response.status_code == 202, response.text
            assert response.headers["x-ratelimit-remaining"] == "19"
            task = wait_for(client, response.json()["id"])
            assert (task["status"], task["attempts"]) == ("succeeded", 2), task
            polled = client.get(f"/tasks/{task['id']}")
            assert polled.headers["ratelimit"].startswith('"read-1s"')
            queues = client.get("/dashboard/0/data/queues.json", headers=AUTH)
            assert queues.status_code == 200
            assert queue in [q["name"] for q in queues.json()["queues"]]
            page = client.get("/dashboard/0/view/queues", headers=AUTH)
            assert page.status_code == 200
    finally:
        stop(worker)
    log = (tmp_path / "worker.log").read_text()
    assert "ConnectionError" not in log and "lost Redis" not in log, log


def test_taskman_serve_on_a_password_redis_runs_tasks_and_never_logs_the_password(
    acl_redis: SecureRedis, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    server = taskman(
        "serve", "--phase", "3", "--port", str(port), "--workers", "1",
        env={
            "TASKMAN_REDIS_URL": acl_redis.url,
            "TASKMAN_QUEUE_NAME": new_queue(),
            "TASKMAN_DASHBOARD_PASSWORD": DASHBOARD_PASSWORD,
            "TASKMAN_RATE_LIMIT_SUBMIT": "2/minute",
            "TASKMAN_LOG_LEVEL": "DEBUG",
        },
        log=log,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", process=server)
        with httpx.Client(base_url=base, timeout=10) as client:
            body = {"type": "echo", "payload": {"value": "ok"}}
            # uvicorn would believe these from 127.0.0.1; `taskman serve` does not
            # (5. below): every request counts against the one real peer.
            forged = [
                {"X-Forwarded-For": "198.51.100.1"},
                {"X-Forwarded-For": "198.51.100.2", "X-Real-IP": "198.51.100.2"},
                {"Forwarded": "for=198.51.100.3", "X-Forwarded-For": "198.51.100.3"},
            ]
            statuses = [client.post("/tasks", json=body, headers=h) for h in forged]
            assert [r.status_code for r in statuses] == [202, 202, 429]
            task_id = statuses[0].json()["id"]
            deadline = time.monotonic() + 20
            while client.get(f"/tasks/{task_id}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline, "the task never ran"
                time.sleep(0.1)
            page = client.get("/dashboard/", headers=AUTH)
            assert page.status_code == 200
            assert ALICE_PASSWORD not in page.text
    finally:
        stop(server)
    output = log.read_text()
    assert "Job OK" in output  # the log is the workers' too
    assert ALICE_PASSWORD not in output


# --- 2. JSON, never pickle


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """RQ's default (pickle) serializer, made to refuse and to tell."""
    used: list[str] = []

    def refusing(name: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            used.append(name)
            raise AssertionError(f"pickle.{name} was called")

        return staticmethod(refuse)

    monkeypatch.setattr(DefaultSerializer, "dumps", refusing("dumps"))
    monkeypatch.setattr(DefaultSerializer, "loads", refusing("loads"))
    return used


def test_api_worker_and_dashboard_never_use_pickle(
    redis_url: str, no_pickle: list[str], tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=redis_url,
        queue_name=new_queue(),
        dashboard_password=DASHBOARD_PASSWORD,
        retry_backoff=[0],
    )
    connection = connect(redis_url)
    assert task_queue(settings, connection).serializer is JSONSerializer
    with TestClient(phase3_production.create_app(settings)) as client:
        ids = [
            client.post("/tasks", json=body).json()["id"]
            for body in (
                {"type": "echo", "payload": {"value": {"a": [1, "x", None]}}},
                {"type": "fail", "payload": {"message": "no"}, "max_retries": 0},
                {"type": "flaky", "payload": {"fail_times": 1}, "max_retries": 1},
            )
        ]
        # The code of `taskman worker`, in this process, where pickle refuses.
        run_worker(settings, burst=True)
        tasks = [wait_for(client, task_id) for task_id in ids]
        assert [t["status"] for t in tasks] == ["succeeded", "failed", "succeeded"]
        # A running job, as the dashboard's workers list shows it.
        worker = start_worker(redis_url, settings.queue_name, tmp_path / "worker.log")
        try:
            body = {"type": "sleep", "payload": {"seconds": 3}}
            running = client.post("/tasks", json=body).json()["id"]
            wait_for(client, running, "running")
            workers = client.get("/dashboard/0/data/workers.json", headers=AUTH)
            current = [w["current_job"] for w in workers.json()["workers"]]
            assert {"job_id": running} in [
                {"job_id": job["job_id"]} for job in current if job != "idle"
            ], current
            ids.append(running)
            # Every page of the dashboard on each job, and a requeue.
            for task_id in ids:
                for rule, methods in RULES:
                    if (
                        "GET" in methods
                        and "requeue" not in rule
                        and "static" not in rule
                    ):
                        path = concrete(
                            rule,
                            job_id=task_id,
                            queue_name=settings.queue_name,
                            registry_name="failed",
                            order="asc",
                            per_page="8",
                            page="1",
                        )
                        response = client.get(path, headers=AUTH)
                        assert response.status_code == 200, path
            requeue = client.post(f"/dashboard/job/{ids[1]}/requeue", headers=AUTH)
            assert requeue.json() == {"status": "OK"}
        finally:
            stop(worker)
    assert no_pickle == []
    values_read = 0
    for task_id in ids:
        # What RQ stores: the call as zlib-compressed JSON, meta as JSON, each
        # result's value as JSON (base64).
        job = connection.hgetall(f"rq:job:{task_id}")
        function, instance, args, kwargs = json.loads(zlib.decompress(job[b"data"]))
        assert function.startswith("common.tasks.")
        assert (instance, args) == (None, [])
        assert isinstance(kwargs, dict)
        assert isinstance(json.loads(job[b"meta"]), dict)
        for _, result in connection.xrange(f"rq:results:{task_id}"):
            if b"return_value" in result:
                json.loads(base64.b64decode(result[b"return_value"]))
                values_read += 1
    assert values_read, "no stored result was read"


class RunsOnUnpickling:
    """A pickle that makes a directory when loaded (what an attacker would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_a_pickled_job_is_failed_by_our_worker_never_unpickled(
    redis_url: str, tmp_path: Path
) -> None:
    queue = new_queue()
    connection = connect(redis_url)
    marker = tmp_path / "unpickled"
    # Someone with access to Redis queues a job with RQ's default serializer.
    pickled = Queue(queue, connection=connection, serializer=DefaultSerializer).enqueue(
        "common.tasks.echo", RunsOnUnpickling(marker), job_id=uuid.uuid4().hex
    )
    # A job in its data, another in its meta (which the dashboard's job page reads).
    json_queue = Queue(queue, connection=connection, serializer=JSONSerializer)
    bad_meta = json_queue.enqueue("common.tasks.echo", 1, job_id=uuid.uuid4().hex)
    connection.hset(bad_meta.key, "meta", pickle.dumps(RunsOnUnpickling(marker)))
    after = json_queue.enqueue("common.tasks.echo", "after", job_id=uuid.uuid4().hex)
    drain(redis_url, queue)
    assert not marker.exists()
    # Failed, not dropped; and the worker went on with the next job.
    assert connection.hget(pickled.key, "status") == b"failed"
    assert after.get_status(refresh=True) == "finished"
    settings = Settings(
        redis_url=redis_url, queue_name=queue, dashboard_password=DASHBOARD_PASSWORD
    )
    with TestClient(
        phase3_production.create_app(settings), raise_server_exceptions=False
    ) as client:
        for job in (pickled, bad_meta):
            for path in (
                f"/tasks/{job.id}",
                f"/dashboard/0/view/job/{job.id}",
                f"/dashboard/0/data/job/{job.id}.json",
                f"/dashboard/0/data/jobs/{queue}/failed/8/asc/1.json",
            ):
                response = client.get(path, headers=AUTH)
                assert not marker.exists(), path
                assert_reached(path, response.status_code)
            for action in ("requeue", "delete"):
                path = f"/dashboard/job/{job.id}/{action}"
                response = client.post(path, headers=AUTH)
                assert not marker.exists(), path
                assert_reached(path, response.status_code)


def assert_reached(path: str, status: int) -> None:
    """The request got past auth to the code that reads the job: a 401, 403 or
    404 would prove nothing about unpickling. (The API's 404 for a job that is
    not JSON is that code's answer.)"""
    if path.startswith("/tasks/"):
        assert status in (200, 404), (path, status)
    else:
        assert status not in (401, 403, 404), (path, status)


# --- 3. Only registered task types run


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize(
    "body",
    [
        *(
            {"type": name, "payload": {"value": 1}}
            for name in (
                "common.tasks.echo",
                "os.system",
                "__import__",
                "builtins.eval",
                "common.tasks:echo",
                "phase2_queue.worker.run_worker",
                "echo.__globals__",
                "ECHO",
            )
        ),
        {"type": "echo", "payload": {"value": 1, "func": "os.system"}},
        {"type": "sleep", "payload": {"seconds": 0, "args": ["rm -rf /"]}},
        {"type": "hash", "payload": {"data": "x", "iterations": 1, "__class__": 1}},
        {"type": "echo", "payload": {"value": 1}, "func": "os.system"},
        {"type": "echo", "payload": {"value": 1}, "kwargs": {"command": "id"}},
    ],
)
def test_a_request_names_a_registered_type_never_a_function_or_its_arguments(
    redis_url: str, phase: ModuleType, body: dict[str, Any]
) -> None:
    settings = Settings(
        redis_url=redis_url,
        queue_name=new_queue(),
        rate_limit_submit="100000/second",
    )
    connection = connect(redis_url)
    with TestClient(phase.create_app(settings)) as client:
        response = client.post("/tasks", json=body)
        assert response.status_code == 422, response.text
        assert connection.llen(f"rq:queue:{settings.queue_name}") == 0
        # What does get queued names the function from the registry, nothing else.
        accepted = client.post("/tasks", json={"type": "echo", "payload": {"value": 1}})
    job = connection.hget(f"rq:job:{accepted.json()['id']}", "data")
    assert json.loads(zlib.decompress(job)) == [
        "common.tasks.echo",
        None,
        [],
        {"value": 1},
    ]


EVIL_MODULE = """
from pathlib import Path

# Imported: that alone runs code.
Path(__file__).with_name("imported").touch()


def hook(*args, **kwargs):
    Path(__file__).with_name("called").touch()
"""


class _Hooked(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Hooked.hits.append(self.path)
        self.send_response(204)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def webhook_url() -> Iterator[str]:
    """An HTTP server that counts the requests it gets."""
    server = HTTPServer(("127.0.0.1", 0), _Hooked)
    _Hooked.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    server.server_close()


def test_our_worker_runs_only_registered_functions_whatever_a_job_names(
    redis_url: str, tmp_path: Path, webhook_url: str
) -> None:
    # An importable module (on the worker's path) that runs code when imported and
    # when called: what anyone who can write to Redis could name in a job.
    (tmp_path / "taskman_evil.py").write_text(EVIL_MODULE)
    queue = new_queue()
    connection = connect(redis_url)
    rq_queue = Queue(queue, connection=connection, serializer=JSONSerializer)

    def enqueue(function: str, *args: Any, **options: Any) -> str:
        job = rq_queue.enqueue(function, *args, job_id=uuid.uuid4().hex, **options)
        return str(job.id)

    hook = Callback("taskman_evil.hook")
    unregistered = [
        enqueue("taskman_evil.hook"),
        enqueue("os.mkdir", str(tmp_path / "mkdir")),
        # Importable from our own module, but not a task type.
        enqueue("common.tasks.describe_error", "x"),
    ]
    failing = enqueue("common.tasks.fail", "no", on_failure=hook)
    succeeding = enqueue(
        "common.tasks.echo",
        "yes",
        on_success=hook,
        webhooks=[Webhook(url=webhook_url, job_status="finished")],
    )
    output = drain(redis_url, queue, PYTHONPATH=str(tmp_path))
    assert not (tmp_path / "imported").exists(), output
    assert not (tmp_path / "called").exists(), output
    assert not (tmp_path / "mkdir").exists(), output
    assert _Hooked.hits == []
    settings = Settings(redis_url=redis_url, queue_name=queue)
    with TestClient(phase2_queue.create_app(settings)) as client:
        for job_id in unregistered:
            task = client.get(f"/tasks/{job_id}").json()
            assert task["status"] == "failed", task
            assert "is not a registered task function" in task["error"], task
        assert client.get(f"/tasks/{failing}").json()["error"] == "RuntimeError: no"
        assert client.get(f"/tasks/{succeeding}").json()["result"] == "yes"


# --- 4. The dashboard's gate on every route, for every method


@pytest.fixture
def dashboard_client(redis_url: str) -> Iterator[TestClient]:
    """The whole phase-3 app (every middleware in front of the dashboard)."""
    settings = Settings(
        redis_url=redis_url,
        queue_name=new_queue(),
        dashboard_password=DASHBOARD_PASSWORD,
    )
    with TestClient(phase3_production.create_app(settings)) as client:
        yield client


@pytest.mark.parametrize(("rule", "methods"), RULES, ids=[rule for rule, _ in RULES])
def test_every_dashboard_route_refuses_a_cross_site_request_even_with_credentials(
    dashboard_client: TestClient, rule: str, methods: list[str]
) -> None:
    path = concrete(rule, queue_name="q", registry_name="failed", order="asc")
    unsafe = [m for m in methods if m not in ("GET", "HEAD")]
    for method in [*unsafe, "PUT", "PATCH", "DELETE"]:
        for origin in ("https://evil.example", "null"):
            response = dashboard_client.request(
                method, path, headers={**AUTH, "Origin": origin}
            )
            assert response.status_code == 403, (method, path, origin)
    if "POST" in methods:
        # No state change by GET either: an <img src> would do it cross-site.
        for method in ("GET", "HEAD"):
            response = dashboard_client.request(method, path, headers=AUTH)
            assert response.status_code == 405, (method, path)


@pytest.mark.parametrize(
    "method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
)
@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/", "/dashboard/x/y"])
def test_the_dashboard_mount_wants_credentials_for_every_method(
    dashboard_client: TestClient, method: str, path: str
) -> None:
    response = dashboard_client.request(method, path, follow_redirects=False)
    assert response.status_code == 401, (method, path)


# --- 5. Rate-limit keys a client cannot choose

FORGED_HEADERS = [
    "X-Real-IP",
    "Forwarded",
    "True-Client-IP",
    "CF-Connecting-IP",
    "X-Client-IP",
    "X-Cluster-Client-IP",
    "Fastly-Client-IP",
    "X-Originating-IP",
]


def forged(i: int) -> dict[str, str]:
    """Every header some proxy uses for the client's address, each a new value."""
    address = f"198.51.100.{i}"
    headers = {name: address for name in FORGED_HEADERS}
    headers["Forwarded"] = f'for="{address}";proto=https'
    return headers


@pytest.mark.parametrize("peer", ["203.0.113.5", "127.0.0.1"])
def test_forged_client_address_headers_from_an_untrusted_peer_change_nothing(
    redis_url: str, peer: str
) -> None:
    app = limited_app(redis_url, rate_limit_read="2/minute")
    with TestClient(app, client=(peer, 4711)) as client:
        statuses = [
            client.get(UNKNOWN_TASK, headers=forged(i)).status_code for i in range(4)
        ]
    assert statuses == [404, 404, 429, 429]


def test_a_trusted_proxy_is_believed_only_in_x_forwarded_for(redis_url: str) -> None:
    app = limited_app(
        redis_url, rate_limit_read="2/minute", trusted_proxies=["10.0.0.0/8"]
    )
    with TestClient(app, client=("10.0.0.1", 4711)) as proxy:
        statuses = [
            proxy.get(
                UNKNOWN_TASK, headers={**forged(i), "X-Forwarded-For": "192.0.2.7"}
            ).status_code
            for i in range(3)
        ]
    assert statuses == [404, 404, 429]


# --- 6. Errors leak no traceback, path, URL or password


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("where", ["down", "wrong-password"])
def test_redis_trouble_never_shows_its_url_or_password(
    phase: ModuleType, where: str, acl_redis: SecureRedis
) -> None:
    # Nobody listens on the port, or alice's URL carries a wrong password.
    port = free_port() if where == "down" else acl_redis.port
    password = ALICE_PASSWORD if where == "down" else BOB_PASSWORD
    url = f"redis://alice:{password}@127.0.0.1:{port}/0"
    settings = Settings(
        redis_url=url,
        rate_limit_fail_mode="closed",
        dashboard_password=DASHBOARD_PASSWORD,
    )
    app = phase.create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        task = "/tasks/" + "0" * 32
        responses = [
            client.post("/tasks", json={"type": "echo", "payload": {"value": 1}}),
            client.get(task),
            client.delete(task),
            client.get("/health"),
        ]
        assert [r.status_code for r in responses] == [503] * 4
        # Phase 3: a scrape still answers; the dashboard fails (Flask's own page).
        responses.append(client.get("/metrics"))
        for path in ("/dashboard/", "/dashboard/0/data/queues.json"):
            responses.append(client.get(path, headers=AUTH))
    for response in responses:
        for secret in (password, "alice", "redis://", str(port), "Traceback", ".py"):
            assert secret not in response.text, (secret, response.text)


@pytest.mark.parametrize("phase", PHASES)
def test_a_wrong_redis_password_is_a_503_that_says_authentication_failed(
    phase: ModuleType, acl_redis: SecureRedis
) -> None:
    url = f"redis://alice:{BOB_PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    settings = Settings(redis_url=url, rate_limit_fail_mode="open")
    with TestClient(phase.create_app(settings), raise_server_exceptions=False) as c:
        task = "/tasks/" + "0" * 32
        responses = [
            c.post("/tasks", json={"type": "echo", "payload": {"value": 1}}),
            c.get(task),
            c.delete(task),
            c.get("/health"),
        ]
    assert [r.status_code for r in responses] == [503] * 4
    for response in responses:
        assert "authentication failed" in response.json()["detail"]
        assert "unreachable" not in response.text
        assert BOB_PASSWORD not in response.text


@pytest.mark.parametrize("phase", ["2", "3"])
def test_a_worker_with_a_wrong_redis_password_says_so_and_keeps_trying(
    phase: str, acl_redis: SecureRedis, tmp_path: Path
) -> None:
    url = f"redis://alice:{BOB_PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    log = tmp_path / "worker.log"
    worker = taskman(
        "worker", "--phase", phase, env={"TASKMAN_REDIS_URL": url}, log=log
    )
    try:
        deadline = time.monotonic() + 20
        while "authentication failed" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1)
        assert worker.poll() is None, "it should keep trying, not crash"
    finally:
        stop(worker)
    text = log.read_text()
    for secret in (BOB_PASSWORD, "Traceback"):
        assert secret not in text, text
    burst = subprocess.run(
        [*taskman_command("worker", "--phase", phase, "--burst")],
        env={**os.environ, "TASKMAN_REDIS_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert burst.returncode == 1
    assert "authentication failed" in burst.stderr + burst.stdout
    assert "Traceback" not in burst.stderr + burst.stdout


@pytest.mark.parametrize("phase", PHASES)
def test_an_internal_error_is_a_bare_500_and_only_the_log_has_details(
    phase: ModuleType, acl_redis: SecureRedis, caplog: pytest.LogCaptureFixture
) -> None:
    # bob may not run Lua nor RPUSH, which the API's enqueue uses (phase 3: a
    # script; phase 2: RQ's transaction): Redis answers NOPERM, an error nobody
    # planned for.
    url = acl_redis.url.replace(f"alice:{ALICE_PASSWORD}", f"bob:{BOB_PASSWORD}")
    settings = Settings(redis_url=url)
    app = phase.create_app(settings)
    with (
        caplog.at_level(logging.ERROR, logger="taskman"),
        TestClient(app, raise_server_exceptions=False) as client,
    ):
        response = client.post("/tasks", json={"type": "echo", "payload": {"value": 1}})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "internal server error"}
    # The log keeps what happened, and where.
    assert "NoPermissionError" in caplog.text
    assert "Traceback" in caplog.text


def test_a_failed_task_reports_its_exception_line_not_the_traceback(
    redis_url: str,
) -> None:
    # A message that looks like more traceback: the error is still the first
    # line of the exception, exactly as phase 1 reports it.
    message = 'boom\n  File "/srv/app/secret.py", line 1, in <module>\n    x = 1\nValueError: spoofed'
    settings = Settings(redis_url=redis_url, queue_name=new_queue())
    with TestClient(phase2_queue.create_app(settings)) as client:
        body = {"type": "fail", "payload": {"message": message}, "max_retries": 0}
        task_id = client.post("/tasks", json=body).json()["id"]
        drain(redis_url, settings.queue_name)
        task = wait_for(client, task_id)
    assert task["status"] == "failed"
    assert (
        task["error"] == describe_error(RuntimeError(message)) == "RuntimeError: boom"
    )


def test_the_dashboard_shows_where_redis_is_never_how_to_log_in(
    acl_redis: SecureRedis,
) -> None:
    # redis-py also takes the password as a query option, which rq-dashboard
    # would print in its instance list.
    url = f"{acl_redis.unprotected_url}?password={ADMIN_PASSWORD}"
    settings = Settings(
        redis_url=url, queue_name=new_queue(), dashboard_password=DASHBOARD_PASSWORD
    )
    with TestClient(phase3_production.create_app(settings)) as client:
        for rule, methods in RULES:
            if "GET" not in methods or "static" in rule:
                continue
            path = concrete(rule, queue_name="q", registry_name="failed", order="asc")
            response = client.get(path, headers=AUTH)
            assert ADMIN_PASSWORD not in response.text, path
        page = client.get("/dashboard/0/view/queues", headers=AUTH).text
    assert f"redis://127.0.0.1:{acl_redis.port}/0" in page
