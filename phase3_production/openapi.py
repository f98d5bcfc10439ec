"""Phase 3: its OpenAPI document also tells what its layers add to the routes:
the rate limit's headers and ``429``, the result cache's ``ETag``, ``X-Cache`` and
``304`` (docs/contract.md, "Phase 3: production layers"). The other phases' schema
stays as they answer: without them."""

from typing import Any

from fastapi import FastAPI

from common.openapi import RETRY_AFTER, header, problem

RATE_LIMIT = {
    "RateLimit-Policy": header(
        'the limits of this route, e.g. `"submit-1s";q=20;w=1` (IETF draft 8)'
    ),
    "RateLimit": header(
        'the closest limit: `"submit-1s";r=19;t=1`, r requests left for t seconds'
    ),
    "X-RateLimit-Limit": header("requests allowed in the closest window", "integer"),
    "X-RateLimit-Remaining": header("requests left in it", "integer"),
    "X-RateLimit-Reset": header("when it resets, in epoch seconds", "integer"),
}
ETAG = {"ETag": header("a digest of the body: send it back in If-None-Match")}
X_CACHE = {"X-Cache": header("`HIT` or `MISS`: whether the result cache answered")}
IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "ETags from earlier answers: `304`, with no body, while the "
    "task still has one of them (RFC 9110; `*` matches any task)",
    "schema": {"type": "string"},
}
TOO_MANY = problem(
    "over a rate limit (`TASKMAN_RATE_LIMIT_SUBMIT`, `TASKMAN_RATE_LIMIT_READ`): "
    "retry after `Retry-After`",
    {**RETRY_AFTER, **RATE_LIMIT},
)


def document_layers(app: FastAPI) -> None:
    """Add phase 3's headers and answers to ``app``'s OpenAPI document, once,
    when it is first built."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _add_layers(build())
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def _add_layers(schema: dict[str, Any]) -> None:
    for path, operations in schema["paths"].items():
        if not (path == "/tasks" or path.startswith("/tasks/")):
            continue  # only /tasks routes are limited
        for method, operation in operations.items():
            responses = operation["responses"]
            for response in responses.values():
                response.setdefault("headers", {}).update(RATE_LIMIT)
            responses["429"] = _jsonable(TOO_MANY)
            if path == "/tasks/{task_id}" and method in ("get", "delete"):
                responses["200"]["headers"].update(ETAG)
            if path == "/tasks/{task_id}" and method == "get":
                responses["200"]["headers"].update(X_CACHE)
                responses["304"] = {
                    "description": "Not Modified: the task is as the ETag says",
                    "headers": {**ETAG, **X_CACHE, **RATE_LIMIT},
                }
                operation.setdefault("parameters", []).append(IF_NONE_MATCH)


def _jsonable(response: dict[str, Any]) -> dict[str, Any]:
    """A ``responses=`` entry (with a model) as an OpenAPI response object."""
    return {
        "description": response["description"],
        "headers": response["headers"],
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }
