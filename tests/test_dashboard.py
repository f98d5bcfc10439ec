"""Phase 3's dashboard: rq-dashboard behind Basic auth and a same-origin check,
off without a password, and never serving a job's text as live HTML."""

import base64
import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer

from common.settings import Settings
from phase1_inprocess import create_app
from phase3_production.dashboard import create_dashboard_app, mount_dashboard
from taskman.redis_server import free_port

PASSWORD = "correct horse battery staple"
XSS = "<script>alert(1)</script><img src=x onerror=alert(1)>"

# rq-dashboard's own routes, read from its Flask url_map (the app connects lazily,
# so no Redis is needed to list them).
_URL_MAP = create_dashboard_app(Settings(redis_url="redis://127.0.0.1:1/0")).url_map
RULES = sorted(
    (rule.rule, sorted(rule.methods or ())) for rule in _URL_MAP.iter_rules()
)
# By view name, for tests that need one route in particular: the one with the
# most parameters when a view has several.
RULES_BY_NAME = {
    rule.endpoint.removeprefix("rq_dashboard."): rule.rule
    for rule in sorted(_URL_MAP.iter_rules(), key=lambda rule: len(rule.arguments))
}


def basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


AUTH = basic("admin", PASSWORD)


def concrete(rule: str, **values: str) -> str:
    """A path of the dashboard for a url_map rule: each <converter:name> filled
    in from ``values``, else with 0 (int) or x."""

    def fill(match: re.Match[str]) -> str:
        converter, name = match[1], match[2]
        return values.get(name, "0" if converter == "int" else "x")

    return "/dashboard" + re.sub(r"<(?:(\w+):)?(\w+)>", fill, rule)


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        queue_name=f"test-{uuid.uuid4().hex[:8]}",
        dashboard_password=PASSWORD,
        cpu_workers=1,
        io_concurrency=2,
    )


def dashboard_app(settings: Settings) -> FastAPI:
    app = create_app(settings)
    mount_dashboard(app, settings)
    return app


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(dashboard_app(settings)) as test_client:
        yield test_client


@pytest.mark.parametrize(("rule", "methods"), RULES, ids=[rule for rule, _ in RULES])
def test_every_dashboard_route_answers_401_without_valid_credentials(
    client: TestClient, rule: str, methods: list[str]
) -> None:
    path = concrete(rule)
    for method in methods:
        for headers in (
            {},
            basic("admin", "wrong"),
            basic("root", PASSWORD),
            {"Authorization": "Bearer x"},
        ):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"].startswith("Basic realm=")


@pytest.mark.parametrize(
    "path", ["/dashboard", "/dashboard/", "/dashboard/not-a-route"]
)
def test_the_mount_itself_and_unknown_paths_answer_401_without_credentials(
    client: TestClient, path: str
) -> None:
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 401
    assert response.json()["detail"]


def test_a_malformed_authorization_header_is_401_not_500(client: TestClient) -> None:
    for value in (
        "Basic !!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic",
    ):
        response = client.get("/dashboard/", headers={"Authorization": value})
        assert response.status_code == 401, value


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/",
        "/dashboard/0/view/queues",
        "/dashboard/0/view/workers",
        "/dashboard/0/view/jobs",
        "/dashboard/0/data/queues.json",
        "/dashboard/0/data/workers.json",
        "/dashboard/static/css/main.css",
        "/dashboard/favicon.ico",
    ],
)
def test_with_credentials_the_dashboard_answers_200(
    client: TestClient, path: str
) -> None:
    response = client.get(path, headers=AUTH)
    assert response.status_code == 200, response.text[:500]
    # What browsers must not sniff or frame.
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


def test_the_bare_mount_redirects_to_the_dashboard_once_authenticated(
    client: TestClient,
) -> None:
    response = client.get("/dashboard", headers=AUTH, follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/dashboard/"


def test_without_a_password_the_dashboard_is_off_with_404_json(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(redis_url=redis_url, cpu_workers=1, io_concurrency=2)
    with caplog.at_level(logging.INFO, logger="taskman"):
        app = dashboard_app(settings)
    assert any("TASKMAN_DASHBOARD_PASSWORD" in r.getMessage() for r in caplog.records)
    with TestClient(app) as client:
        for path in ("/dashboard", "/dashboard/", "/dashboard/0/view/jobs"):
            for headers in ({}, basic("admin", "")):
                response = client.get(path, headers=headers, follow_redirects=False)
                assert response.status_code == 404, path
                assert response.json() == {"detail": "Not Found"}


def test_an_empty_password_leaves_the_dashboard_off(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, dashboard_password="", cpu_workers=1)
    with TestClient(dashboard_app(settings)) as client:
        assert client.get("/dashboard/", headers=basic("admin", "")).status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://testserver.evil.example"},
        {"Origin": "http://testserver:8080"},
        {"Referer": "https://evil.example/page"},
    ],
)
def test_a_post_from_a_foreign_origin_is_refused_with_403(
    client: TestClient, settings: Settings, headers: dict[str, str]
) -> None:
    response = client.post(
        f"/dashboard/queue/{settings.queue_name}/finished/empty",
        headers={**AUTH, **headers},
    )
    assert response.status_code == 403
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://testserver"},
        {"Origin": "http://TestServer:80"},
        {"Referer": "http://testserver/dashboard/0/view/jobs"},
        {},  # curl, scripts: no browser, nothing to forge
    ],
)
def test_a_post_from_the_same_origin_goes_through(
    client: TestClient, settings: Settings, headers: dict[str, str]
) -> None:
    response = client.post(
        f"/dashboard/queue/{settings.queue_name}/finished/empty",
        headers={**AUTH, **headers},
    )
    assert response.status_code == 200, response.text[:500]
    assert response.json() == {"status": "OK"}


def test_requeue_all_by_get_is_refused(client: TestClient, settings: Settings) -> None:
    response = client.get(f"/dashboard/requeue/{settings.queue_name}", headers=AUTH)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


@pytest.fixture
def failed_xss_job(settings: Settings) -> Job:
    """A real failed RQ job whose arguments and exception text carry markup."""
    assert settings.redis_url
    connection = redis.Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    job = queue.enqueue("common.tasks.fail", message=XSS)
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer)
    worker.work(burst=True)
    assert job.get_status(refresh=True) == "failed"
    return job


def test_markup_in_a_failed_job_is_never_served_unescaped(
    client: TestClient, settings: Settings, failed_xss_job: Job
) -> None:
    values = {
        "queue_name": settings.queue_name,
        "job_id": failed_xss_job.id,
        "per_page": "8",
        "order": "asc",
        "page": "1",
    }
    served = 0
    for rule, methods in RULES:
        if "GET" not in methods or "static" in rule or "requeue" in rule:
            continue
        for registry in ("failed", "queued", "finished"):
            path = concrete(rule, registry_name=registry, **values)
            response = client.get(path, headers=AUTH)
            assert response.status_code == 200, path
            body = response.text.lower()
            assert "<script>alert" not in body, path
            assert "<img" not in body, path
            served += 1
    assert served >= 10
    # The job is there, with its text intact for a JSON reader.
    job = client.get(concrete(RULES_BY_NAME["job_info"], **values), headers=AUTH)
    assert XSS in job.json()["exc_info"]
    assert XSS in job.json()["description"]
    listed = client.get(
        concrete(RULES_BY_NAME["list_jobs"], registry_name="failed", **values),
        headers=AUTH,
    )
    assert [j["id"] for j in listed.json()["jobs"]] == [failed_xss_job.id]


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/0/view/queues",
        "/dashboard/0/view/workers",
        "/dashboard/0/view/jobs",
        "/dashboard/0/view/job/x",
    ],
)
def test_the_pages_insert_job_data_into_the_dom_escaped(
    client: TestClient, path: str, failed_xss_job: Job
) -> None:
    # The pages fetch the JSON and fill underscore templates: `<%= %>` would insert
    # it as HTML, `<%- %>` escapes. jQuery's .text().html() escapes too.
    path = path.replace("/x", f"/{failed_xss_job.id}")
    page = client.get(path, headers=AUTH).text
    raw = re.findall(r"<%=(.*?)%>", page, re.DOTALL)
    assert all(expression.strip().endswith(".html()") for expression in raw), raw
    assert "<%-" in page


def test_a_queue_name_in_the_url_cannot_inject_script(
    client: TestClient, redis_url: str
) -> None:
    evil = "');alert(1);('"
    rule = RULES_BY_NAME["jobs_overview"]
    path = concrete(
        rule,
        queue_name=evil,
        registry_name="failed",
        order="asc",
        per_page="8",
        page="1",
    )
    # At the gate: not a path the dashboard serves.
    assert client.get(path, headers=AUTH).status_code == 404
    # Behind it as well: the name reaches the page's JavaScript as a JSON string.
    flask_app: Any = create_dashboard_app(Settings(redis_url=redis_url))
    page = (
        flask_app.test_client()
        .get(path.removeprefix("/dashboard"))
        .get_data(as_text=True)
    )
    assert "alert(1)" in page
    assert "'');alert(1);(''" not in page
    assert json.dumps(evil).replace("'", "\\u0027") in page


def test_paths_the_dashboard_cannot_serve_are_json_4xx_never_500(
    client: TestClient, settings: Settings
) -> None:
    queue = settings.queue_name
    gets = [
        "/dashboard/0/data/job/nope.json",  # a missing job
        "/dashboard/0/view/job/nope",
        f"/dashboard/0/data/jobs/{queue}/bogus/8/asc/1.json",  # a bad registry
        f"/dashboard/0/view/jobs/{queue}/bogus/8/asc/1",
        f"/dashboard/0/data/jobs/{queue}/failed/0/asc/1.json",  # per_page=0
        f"/dashboard/0/data/jobs/{queue}/queued/x/asc/1.json",
        f"/dashboard/0/data/jobs/{queue}/queued/{10**20}/asc/1.json",
        f"/dashboard/0/view/jobs/{queue}/queued/8/asc/0",  # page 0
        "/dashboard/5/view/jobs",  # no such Redis instance
        "/dashboard/0/data/nothing-here.json",
    ]
    posts = ["/dashboard/job/nope/requeue", f"/dashboard/queue/{queue}/bogus/empty"]
    answers = [client.get(path, headers=AUTH) for path in gets]
    answers += [client.post(path, headers=AUTH) for path in posts]
    for answer in answers:
        assert answer.status_code == 404, (answer.url, answer.text[:200])
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["detail"]
    # An empty queue compacts to nothing (RQ's compact() fails on it).
    compact = client.post(f"/dashboard/queue/{queue}/compact", headers=AUTH)
    assert compact.status_code == 200
    assert compact.json() == {"status": "OK"}


def test_the_dashboard_with_redis_down_answers_503_json(settings: Settings) -> None:
    down = settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    with TestClient(dashboard_app(down), raise_server_exceptions=False) as client:
        for path in (
            "/dashboard/0/data/queues.json",
            "/dashboard/0/data/workers.json",
            "/dashboard/0/data/job/nope.json",
            "/dashboard/0/view/workers",
        ):
            answer = client.get(path, headers=AUTH)
            assert answer.status_code == 503, (path, answer.text[:200])
            assert "unreachable" in answer.json()["detail"]
            assert answer.headers["retry-after"] == "1"
