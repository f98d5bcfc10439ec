"""Schemathesis over each phase's own OpenAPI schema: whatever it generates from it,
valid or not, the API answers without a server error, and as the schema says."""

import importlib
import re
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    unsupported_method,
)

from common.settings import Settings
from common.tasks import TASKS

# Phases 2 and 3 join with one entry each; they get the suite's Redis.
SCHEMA_PHASES = ["phase1_inprocess", "phase2_queue", "phase3_production"]

# Generated examples per operation, besides schemathesis's own boundary cases; the
# valid ones queue real tasks (sleeps of up to 60 s, primes up to 20 million) that
# pile up in the background, so stay modest.
MAX_EXAMPLES = 300

CHECKS = [
    not_a_server_error,
    # Every answer is what the schema says: its media type, its body's shape.
    content_type_conformance,
    response_schema_conformance,
    # A request that breaks the schema gets a 4xx, an undeclared method a 405.
    negative_data_rejection,
    unsupported_method,
]


# A request that breaks the schema is refused with one of these. Schemathesis's own
# list lacks 413: a batch of over 1000 tasks (against maxItems) is over the body
# limit too, and the limit answers first, before the body is even read.
REJECTIONS = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
)


def own_schema(module: str) -> schemathesis.BaseSchema:
    """The phase's OpenAPI document. Building it runs no lifespan, so needs no Redis."""
    app: FastAPI = importlib.import_module(module).create_app(Settings())
    return schemathesis.openapi.from_dict(app.openapi(), config=CONFIG)


SCHEMAS = {module.split("_")[0]: own_schema(module) for module in SCHEMA_PHASES}


@pytest.fixture(scope="module")
def apps(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, FastAPI]]:
    """Each phase's app, by the title its schema carries; one lifespan per phase."""
    built = {}
    for module in SCHEMA_PHASES:
        values: dict[str, Any] = {
            "cpu_workers": 1,
            "shutdown_timeout": 1,
            # A queue of its own: no worker of another test runs a fuzzed task.
            "queue_name": "taskman-schema",
            "data_dir": tmp_path_factory.mktemp("schema"),
            # Phase 3 would answer most of the run with 429 before looking at it.
            "rate_limit_submit": "1000000/second",
            "rate_limit_read": "1000000/second",
        }
        if module != "phase1_inprocess":
            values["redis_url"] = request.getfixturevalue("redis_url")
        app: FastAPI = importlib.import_module(module).create_app(Settings(**values))
        built[app.title] = app
    yield built
    # Schemathesis starts an app's lifespan on its first call and keeps it until
    # the process exits, unless told otherwise.
    shutdown_lifespans()


@schemathesis.pytest.parametrize(**SCHEMAS)
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
def test_no_generated_request_gets_a_server_error_or_an_answer_off_schema(
    case: schemathesis.Case[Any], apps: dict[str, FastAPI]
) -> None:
    case.call_and_validate(app=apps[case.operation.schema.title], checks=CHECKS)


# --- the document's shape: what a client generated from it learns


def schema_of(module: str) -> dict[str, Any]:
    app: FastAPI = importlib.import_module(module).create_app(Settings())
    document: dict[str, Any] = app.openapi()
    return document


PHASE1 = schema_of("phase1_inprocess")
PHASE3 = schema_of("phase3_production")
COMPONENTS = PHASE1["components"]["schemas"]
TASK_ROUTES = [
    ("post", "/tasks"),
    ("post", "/tasks/batch"),
    ("get", "/tasks"),
    ("get", "/tasks/{task_id}"),
    ("get", "/tasks/{task_id}/events"),
    ("delete", "/tasks/{task_id}"),
]


def resolve(ref: str) -> dict[str, Any]:
    found: dict[str, Any] = COMPONENTS[ref.removeprefix("#/components/schemas/")]
    return found


def test_a_task_request_is_a_union_of_one_object_per_type_told_by_type() -> None:
    union = COMPONENTS["TaskCreate"]
    refs = [choice["$ref"] for choice in union["oneOf"]]
    assert union["discriminator"]["propertyName"] == "type"
    mapping = union["discriminator"]["mapping"]
    assert sorted(mapping) == sorted(TASKS)
    assert sorted(mapping.values()) == sorted(refs)
    for name, ref in mapping.items():
        task = resolve(ref)
        assert task["properties"]["type"]["const"] == name
        assert task["required"] == ["type", "payload"]
        assert task["additionalProperties"] is False
        options = set(task["properties"]) - {"type", "payload"}
        assert options == {"max_retries", "priority", "delay_seconds", "run_at"}
        payload = resolve(task["properties"]["payload"]["$ref"])
        assert payload["title"] == TASKS[name].payload.__name__
        assert payload["additionalProperties"] is False


def test_each_payload_carries_its_limits() -> None:
    def field(name: str, key: str) -> dict[str, Any]:
        task = resolve(COMPONENTS["TaskCreate"]["discriminator"]["mapping"][name])
        payload = resolve(task["properties"]["payload"]["$ref"])
        assert key in payload["required"]
        found: dict[str, Any] = payload["properties"][key]
        return found

    limits = {
        ("sleep", "seconds"): ("number", 0, 60),
        ("primes", "limit"): ("integer", 2, 20_000_000),
        ("hash", "iterations"): ("integer", 1, 2_000_000),
        ("flaky", "fail_times"): ("integer", 0, 10),
    }
    for (name, key), (kind, low, high) in limits.items():
        found = field(name, key)
        assert (found["type"], found["minimum"], found["maximum"]) == (kind, low, high)
    assert field("hash", "data") == {
        "type": "string",
        "maxLength": 16384,
        "title": "Data",
    }
    assert field("fail", "message")["maxLength"] == 1024
    assert (
        "16384 bytes"
        in resolve(COMPONENTS["TaskCreate"]["discriminator"]["mapping"]["echo"])[
            "properties"
        ]["payload"]["description"]
    )
    task = resolve(COMPONENTS["TaskCreate"]["oneOf"][0]["$ref"])
    retries = task["properties"]["max_retries"]["anyOf"][0]
    assert (retries["minimum"], retries["maximum"]) == (0, 10)
    delay = task["properties"]["delay_seconds"]["anyOf"][0]
    assert (delay["minimum"], delay["maximum"]) == (0, 86400)


def test_a_batch_holds_1_to_1000_of_the_same_union() -> None:
    tasks = COMPONENTS["BatchCreate"]["properties"]["tasks"]
    assert tasks["items"] == {"$ref": "#/components/schemas/TaskCreate"}
    assert (tasks["minItems"], tasks["maxItems"]) == (1, 1000)


def _error_ref(response: dict[str, Any]) -> str:
    ref: str = response["content"]["application/json"]["schema"]["$ref"]
    return ref.removeprefix("#/components/schemas/")


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", "/tasks", {409, 413, 422, 503}),
        ("post", "/tasks/batch", {409, 413, 422, 503}),
        ("get", "/tasks", {422, 503}),
        ("get", "/tasks/{task_id}", {404, 422, 503}),
        ("get", "/tasks/{task_id}/events", {404, 503}),
        ("delete", "/tasks/{task_id}", {404, 409, 503}),
        ("get", "/health", {503}),
    ],
)
def test_every_route_lists_its_errors_with_their_json(
    method: str, path: str, statuses: set[int]
) -> None:
    responses = PHASE1["paths"][path][method]["responses"]
    listed = {int(status) for status in responses if int(status) >= 400}
    assert statuses <= listed, listed
    for status in listed:
        model = _error_ref(responses[str(status)])
        assert model == {
            422: "Invalid",
            503: "Degraded" if path == "/health" else "Problem",
        }.get(status, "Problem"), (status, model)
        if status == 503:
            assert "Retry-After" in responses[str(status)]["headers"]
    assert "429" not in responses  # phase 1 has no rate limit
    assert COMPONENTS["Problem"]["required"] == ["detail"]
    item = COMPONENTS["InvalidItem"]
    assert sorted(item["required"]) == ["loc", "msg", "type"]


def test_a_submit_documents_its_location_header() -> None:
    responses = PHASE1["paths"]["/tasks"]["post"]["responses"]
    for status in ("202", "200"):
        assert "Location" in responses[status]["headers"]


@pytest.mark.parametrize(("method", "path"), TASK_ROUTES)
def test_phase3_documents_its_rate_limit_on_every_task_route(
    method: str, path: str
) -> None:
    responses = PHASE3["paths"][path][method]["responses"]
    limited = responses["429"]
    assert _error_ref(limited) == "Problem"
    assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(limited["headers"])
    for response in responses.values():
        headers = set(response["headers"])
        assert {"RateLimit", "RateLimit-Policy", "X-RateLimit-Limit"} <= headers
        assert {"X-RateLimit-Remaining", "X-RateLimit-Reset"} <= headers


def test_phase3_documents_etag_x_cache_and_304_on_a_task() -> None:
    read = PHASE3["paths"]["/tasks/{task_id}"]["get"]
    assert {"ETag", "X-Cache"} <= set(read["responses"]["200"]["headers"])
    assert {"ETag", "X-Cache"} <= set(read["responses"]["304"]["headers"])
    assert "If-None-Match" in [p["name"] for p in read["parameters"]]
    cancel = PHASE3["paths"]["/tasks/{task_id}"]["delete"]
    assert "ETag" in cancel["responses"]["200"]["headers"]
    # Not the other phases: they send none of it.
    assert "304" not in PHASE1["paths"]["/tasks/{task_id}"]["get"]["responses"]
    assert "/health" in PHASE3["paths"]
    assert "429" not in PHASE3["paths"]["/health"]["get"]["responses"]


def test_the_docs_pages_load_their_scripts_from_the_app() -> None:
    from fastapi.testclient import TestClient

    app = importlib.import_module("phase1_inprocess").create_app(Settings())
    client = TestClient(app)  # no lifespan: the pages need no backend
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        html = response.text
        # The browser may load nothing from elsewhere, even what the page asks.
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "img-src 'self' data:" in policy
        assert "http://" not in html and "https://" not in html, html
        for asset in re.findall(r'(?:src|href)="([^"]+)"', html):
            response = client.get(asset)
            assert response.status_code == 200, asset
            assert len(response.content) > 1000 or asset.endswith(".png")
    assert "/docs" not in PHASE1["paths"] and "/redoc" not in PHASE1["paths"]
