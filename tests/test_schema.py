"""Schemathesis over each phase's own OpenAPI schema: whatever it generates from it,
valid or not, the API answers without a server error, and as the schema says."""

import importlib
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    unsupported_method,
)

from common.settings import Settings

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


def own_schema(module: str) -> schemathesis.BaseSchema:
    """The phase's OpenAPI document. Building it runs no lifespan, so needs no Redis."""
    app: FastAPI = importlib.import_module(module).create_app(Settings())
    return schemathesis.openapi.from_dict(app.openapi())


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
