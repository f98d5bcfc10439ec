"""The wire format of docs/contract.md: what a client sends and what it gets back."""

import hashlib
import json
import secrets
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, Self, Union

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import (
    CoreSchema,
    PydanticCustomError,
    PydanticSerializationError,
    to_json,
)

from common.tasks import MAX_TEXT, TASKS


class TaskStatus(StrEnum):
    SCHEDULED = "scheduled"  # waits for its run_at (delay_seconds, run_at)
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED)


class Priority(StrEnum):
    """Which queue a task waits in. Runners take ``high`` first, then ``normal``,
    then ``low``: strictly, so a steady stream of high tasks starves the rest."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


MAX_DELAY_SECONDS = 24 * 3600


class Progress(BaseModel):
    """How far a running task has come, as its function reports it
    (:func:`common.context.report_progress`)."""

    done: int = Field(ge=0)
    total: int = Field(ge=0)
    message: str | None = Field(default=None, max_length=200)


class TaskCreate(BaseModel):
    """A request to run a registered task type on a payload.

    One model validates every type (its messages are part of the contract, see
    tests/test_bad_input.py); its JSON schema is the union of one object per type,
    told apart by ``type``, so a client generated from the OpenAPI document knows
    each payload and its limits (:func:`_one_object_per_type`).
    """

    model_config = ConfigDict(extra="forbid")

    type: str = Field(examples=["primes"], description=f"one of {', '.join(TASKS)}")
    payload: dict[str, Any] = Field(examples=[{"limit": 100000}])
    max_retries: int | None = Field(default=None, ge=0, le=10, strict=True)
    priority: Priority = Priority.NORMAL
    delay_seconds: float | None = Field(
        default=None, ge=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False, strict=True
    )
    # Not strict=True: FastAPI validates the parsed JSON in Python mode, where a
    # strict datetime refuses every string. _run_at_is_text keeps numbers out.
    run_at: AwareDatetime | None = Field(
        default=None,
        description="ISO-8601 with a zone, e.g. 2026-12-03T12:00:00Z",
    )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(_TASK_UNION.core_schema)
        schema.update(
            title=cls.__name__, description=(cls.__doc__ or "").split("\n")[0]
        )
        return schema

    @field_validator("run_at", mode="before")
    @classmethod
    def _run_at_is_text(cls, value: Any) -> Any:
        """ISO-8601 text (or a datetime, from Python), never a bare number that
        lax parsing would read as a Unix time."""
        if value is None or isinstance(value, str | datetime):
            return value
        raise PydanticCustomError(
            "datetime_type", "run_at should be an ISO-8601 date and time with a zone"
        )

    @model_validator(mode="after")
    def _when_is_one_moment(self) -> Self:
        if self.delay_seconds is not None and self.run_at is not None:
            raise PydanticCustomError(
                "delay_and_run_at", "give delay_seconds or run_at, not both"
            )
        if self.run_at is not None:
            self.run_at = self.run_at.astimezone(UTC)
            ahead = (self.run_at - utcnow()).total_seconds()
            if ahead < 0:
                raise PydanticCustomError(
                    "run_at_past",
                    "run_at is in the past: {run_at}",
                    {"run_at": str(self.run_at)},
                )
            if ahead > MAX_DELAY_SECONDS:
                raise PydanticCustomError(
                    "run_at_too_far", "run_at must be within 24 hours from now"
                )
        return self

    def due_at(self, now: datetime) -> datetime | None:
        """When the task may run, if not at once (None: queue it now)."""
        if self.run_at is not None:
            return self.run_at
        if self.delay_seconds:  # 0 is "now"
            return now + timedelta(seconds=self.delay_seconds)
        return None

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
        # JSON may smuggle in lone surrogates ("\ud800"): text no worker could
        # encode, store or hash. Refuse it here, once, for every type. pydantic's
        # to_json (~0.3 µs for an echo's payload against json.dumps' ~4, a batch
        # of 100 validates 100) cannot encode one; when it fails, for that or
        # another reason (nesting past its depth limit), json.dumps decides.
        try:
            to_json(self.payload)
        except PydanticSerializationError:
            try:
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


# The schema side of TaskCreate: one model a type, used for the JSON schema only.
SCHEMA_NOTES = {
    "echo": f"value: any JSON, at most {MAX_TEXT} bytes as UTF-8 JSON",
    "max_retries": "retries after the first attempt; null: the server's default (3)",
    "priority": "runners take high first, then normal, then low",
    "delay_seconds": "run no sooner than this many seconds from now; not with run_at",
    "run_at": "run no sooner: ISO-8601 with a zone, e.g. 2026-12-03T12:00:00Z, "
    "from now to 24 hours ahead; not with delay_seconds",
}


def _one_object_per_type(name: str) -> type[BaseModel]:
    """TaskCreate's fields, with ``type`` this one and ``payload`` its model."""
    task_type = TASKS[name]
    options = {
        field: (
            info.annotation,
            FieldInfo.merge_field_infos(info, description=SCHEMA_NOTES[field]),
        )
        for field, info in TaskCreate.model_fields.items()
        if field not in ("type", "payload")
    }
    return create_model(  # type: ignore[call-overload,no-any-return]
        f"{name.capitalize()}Task",
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"`{name}`: {(task_type.run.__doc__ or '').strip()}",
        type=(Literal[name], Field(description="the task type")),
        payload=(
            task_type.payload,
            Field(
                description=SCHEMA_NOTES.get(name, f"the payload of a `{name}` task")
            ),
        ),
        **options,
    )


_TASK_UNION: TypeAdapter[Any] = TypeAdapter(
    Annotated[  # type: ignore[arg-type]
        Union[tuple(_one_object_per_type(name) for name in TASKS)],  # noqa: UP007
        Field(discriminator="type"),
    ]
)


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
    priority: Priority = Priority.NORMAL
    run_at: datetime | None = None  # a scheduled task's due time
    progress: Progress | None = None


class TaskPage(BaseModel):
    """One page of ``GET /tasks``, newest first; ``next_cursor`` fetches the next
    one (null: there is no more). A filtered page may hold fewer than ``limit``
    tasks and still have a next one: each page looks at a bounded number."""

    tasks: list[Task]
    next_cursor: str | None = None


MAX_BATCH = 1000


class BatchCreate(BaseModel):
    """``POST /tasks/batch``: up to 1000 tasks, all valid or none queued."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskCreate] = Field(min_length=1, max_length=MAX_BATCH)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


class TaskList(BaseModel):
    """The tasks a batch queued, in the order they were sent."""

    tasks: list[Task]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_task(request: TaskCreate, default_retries: int) -> Task:
    """The task a POST answers with: queued (or scheduled, when it has a due time
    to wait for), not yet tried, under a fresh id."""
    created = utcnow()
    due = request.due_at(created)
    return Task(
        id=secrets.token_hex(16),  # as uuid4().hex, at a third of the cost
        type=request.type,
        status=TaskStatus.QUEUED if due is None else TaskStatus.SCHEDULED,
        payload=request.payload,
        max_retries=(
            default_retries if request.max_retries is None else request.max_retries
        ),
        created_at=created,
        priority=request.priority,
        run_at=due,
    )
