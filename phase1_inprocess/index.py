"""Phase 1's ``GET /tasks``: the positions of the tasks in memory, kept in order.

Phases 2 and 3 keep the same positions (common/listing.py) as a sorted set in
Redis; here they are a sorted Python list, and a page is a slice of it read
backwards from the cursor with :mod:`bisect`, so it costs what the page looks
at, never a walk over every task.
"""

from bisect import bisect_left, insort
from collections.abc import Callable

from common.listing import TaskQuery, encode_cursor, position
from common.models import Task, TaskPage


class TaskIndex:
    """Every task's position, ascending (so newest last)."""

    def __init__(self) -> None:
        self._positions: list[str] = []

    def add(self, task: Task) -> None:
        where = position(task.id, task.created_at)
        # Tasks come in creation order, so this is an append; insort() only if
        # the wall clock stepped back.
        if not self._positions or where > self._positions[-1]:
            self._positions.append(where)
        else:
            insort(self._positions, where)

    def remove(self, task: Task) -> None:
        where = position(task.id, task.created_at)
        i = bisect_left(self._positions, where)
        if i < len(self._positions) and self._positions[i] == where:
            del self._positions[i]  # a memmove: microseconds for 100 000 tasks

    def page(self, query: TaskQuery, read: Callable[[str], Task]) -> TaskPage:
        """Newest first from ``query.after``: look at up to ``query.budget``
        tasks, keep those that match, stop at ``query.limit`` kept."""
        end = (
            bisect_left(self._positions, query.after)
            if query.after is not None
            else len(self._positions)
        )
        start = max(0, end - query.budget)
        kept: list[Task] = []
        last = end  # the index of the last task looked at
        for last in range(end - 1, start - 1, -1):
            task = read(self._positions[last][17:])  # "{µs:016d}:{id}"
            if query.matches(task):
                kept.append(task)
                if len(kept) == query.limit:
                    break
        more = last > 0
        cursor = encode_cursor(self._positions[last]) if more else None
        return TaskPage(tasks=kept, next_cursor=cursor)
