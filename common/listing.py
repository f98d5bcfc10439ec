"""``GET /tasks``: the query every phase answers, and its opaque cursor.

Every phase lists newest first, by creation time then id, so a cursor is the
position of the last task a page showed: ``{created_at in µs, 16 digits}:{id}``.
Phases 2 and 3 keep exactly that string as the member of a sorted set in Redis
(every score 0, so Redis orders members as text, which is that order); phase 1
compares it in memory. The client sees it base64-encoded: opaque, and checked.
"""

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from common.models import Task, TaskPage, TaskStatus

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
# A filtered page looks at no more than this many tasks (newest first from the
# cursor), so its cost is bounded whatever the filter matches; it may then
# answer fewer than ``limit`` tasks, with a cursor to go on from.
SCAN_FACTOR = 10
MAX_SCAN = 2000

_POSITION = re.compile(r"[0-9]{16}:[0-9a-f]{32}")


class BadCursor(ValueError):
    """A cursor this API did not hand out."""


@dataclass(frozen=True)
class TaskQuery:
    status: TaskStatus | None = None
    type: str | None = None
    limit: int = DEFAULT_LIMIT
    after: str | None = None  # a position (see position()): list what is older

    @property
    def filtered(self) -> bool:
        return self.status is not None or self.type is not None

    @property
    def budget(self) -> int:
        """How many tasks one page may look at."""
        return (
            min(self.limit * SCAN_FACTOR, MAX_LIMIT * 2)
            if self.filtered
            else self.limit
        )

    def matches(self, task: Task) -> bool:
        return (self.status is None or task.status is self.status) and (
            self.type is None or task.type == self.type
        )


def position(task_id: str, created_at: datetime) -> str:
    """Where a task sorts: text order is creation order, then id order."""
    micros = int(created_at.timestamp() * 1_000_000)
    return f"{micros:016d}:{task_id}"


def encode_cursor(position: str) -> str:
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The position a cursor names; BadCursor if it is not one of ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        raise BadCursor("cursor is not one this API gave out") from None
    if not _POSITION.fullmatch(text):
        raise BadCursor("cursor is not one this API gave out")
    return text


class Missing(Enum):
    GONE = "gone"  # an index entry whose job has expired (or was deleted)


GONE = Missing.GONE


def page_of(
    query: TaskQuery, members: Sequence[str], found: Sequence[Task | Missing | None]
) -> tuple[TaskPage, list[str]]:
    """The page that index entries read newest first from the cursor make, each
    member with what its job reads as (a task; None, a job that is no task we can
    read, which is skipped; GONE); and the members to drop from the index, those
    whose job is gone. The page ends at ``query.limit`` matches; it has a cursor if
    it stopped short of what was read, or read all the query's budget (phases 2
    and 3 read at most that many: a filter that matches little costs no more)."""
    tasks: list[Task] = []
    gone: list[str] = []
    looked = 0
    for member, task in zip(members, found, strict=True):
        looked += 1
        if task is GONE:
            gone.append(member)
        elif task is not None and query.matches(task):
            tasks.append(task)
            if len(tasks) == query.limit:
                break
    more = looked < len(members) or len(members) == query.budget
    cursor = encode_cursor(members[looked - 1]) if more and looked else None
    return TaskPage(tasks=tasks, next_cursor=cursor), gone
