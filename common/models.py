"""The wire format of docs/contract.md: what a client sends and what it gets back."""

import hashlib
import json
import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from common.tasks import TASKS


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED)


class TaskCreate(BaseModel):
    """A request to run a registered task type on a payload."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(examples=["primes"], description=f"one of {', '.join(TASKS)}")
    payload: dict[str, Any] = Field(examples=[{"limit": 100000}])
    max_retries: int | None = Field(default=None, ge=0, le=10, strict=True)

    @model_validator(mode="after")
    def _payload_fits_type(self) -> Self:
        task_type = TASKS.get(self.type)
        if task_type is None:
            raise PydanticCustomError(
                "unknown_task_type",
                "unknown task type {type}; known types: {known}",
                # ascii(): a lone surrogate in the name must not break the message.
                {"type": ascii(self.type[:64]), "known": ", ".join(TASKS)},
            )
        try:
            # JSON may smuggle in lone surrogates ("\ud800"): text no worker could
            # encode, store or hash. Refuse it here, once, for every type.
            json.dumps(self.payload, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise PydanticCustomError(
                "invalid_text", "payload holds text that is not valid Unicode"
            ) from None
        try:
            model = task_type.payload.model_validate(self.payload)
        except ValidationError as error:
            # One readable line per problem, e.g. "payload.limit: Input should be ...".
            problems = "; ".join(
                f"payload.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                for e in error.errors(include_url=False)
            )
            raise PydanticCustomError("invalid_payload", problems) from None
        self.payload = model.model_dump(mode="json")
        return self

    def fingerprint(self) -> str:
        """A digest of the request, to tell a true repeat from a reused key."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


class Task(BaseModel):
    """A task as every phase reports it."""

    id: str
    type: str
    status: TaskStatus
    payload: dict[str, Any]
    result: Any = None
    error: str | None = None
    attempts: int = 0
    max_retries: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_task(request: TaskCreate, default_retries: int) -> Task:
    """The task a POST answers with: queued, not yet tried, under a fresh id."""
    return Task(
        id=secrets.token_hex(16),  # as uuid4().hex, at a third of the cost
        type=request.type,
        status=TaskStatus.QUEUED,
        payload=request.payload,
        max_retries=(
            default_retries if request.max_retries is None else request.max_retries
        ),
        created_at=utcnow(),
    )
