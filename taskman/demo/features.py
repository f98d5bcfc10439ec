"""A step of the tour that every phase could show: what a task API gives beyond
one POST and a poll (a batch, priorities, a list, a delay, a wait, progress).

It runs in phase 1's tour, where it is quickest; the calls are the same in every
phase, and the narration says which RQ feature phase 2 maps each one to.
"""

import json
import time

import httpx

from taskman.demo.narration import DemoError, Tour, short


def features(tour: Tour, client: httpx.Client) -> None:
    tour.step(
        "Beyond one POST and a poll",
        "A batch in one request, a list, a delayed task waited on without "
        "polling, and the progress of a long one, as it happens.",
    )
    batch = {
        "tasks": [
            {"type": "echo", "payload": {"value": "low"}, "priority": "low"},
            {"type": "echo", "payload": {"value": "high"}, "priority": "high"},
            {"type": "echo", "payload": {"value": "normal"}},
        ]
    }
    response = tour.call(client, "POST", "/tasks/batch", batch, quiet=True)
    if response.status_code != 202:
        raise DemoError(f"POST /tasks/batch answered {response.status_code}")
    tasks = response.json()["tasks"]
    tour.say(
        f"  [blue]→ POST /tasks/batch  {json.dumps(batch)[:90]}…[/blue]\n"
        f"  ← 202 Accepted: {len(tasks)} tasks, in the order sent: "
        + ", ".join(f"{short(t['id'])} ({t['priority']})" for t in tasks)
    )
    tour.notice(
        "all valid and all queued, or none: one bad task is a 422 naming its "
        "index. Phase 2 does it with RQ's Queue.enqueue_many, in one transaction; "
        "each priority is an RQ queue, and workers take high, then normal, then low."
    )
    page = tour.call(client, "GET", "/tasks?limit=3", quiet=True).json()
    tour.say(
        "  [blue]→ GET /tasks?limit=3[/blue]  ← 200 OK · newest first: "
        + ", ".join(f"{short(t['id'])} {t['status']}" for t in page["tasks"])
        + (" · and a next_cursor for the page after" if page["next_cursor"] else "")
    )

    delayed = {"type": "echo", "payload": {"value": "later"}, "delay_seconds": 1}
    submitted = tour.call(client, "POST", "/tasks", delayed, compact=True)
    task_id = submitted.json()["id"]
    started = time.monotonic()
    waited = tour.call(client, "GET", f"/tasks/{task_id}?wait=10", compact=True)
    if waited.json().get("status") != "succeeded":
        raise DemoError(f"the delayed task ended {waited.json().get('status')}")
    tour.notice(
        f"'scheduled' for a second, then run; the GET with ?wait=10 answered "
        f"{time.monotonic() - started:.1f} s later, as soon as it was done, with no "
        "polling (phase 2: RQ's enqueue_in, and a blocking read of its results stream)."
    )

    body = {
        "type": "hash",
        "payload": {"data": "x", "iterations": tour.pace.hash_iterations},
    }
    long_id = tour.call(client, "POST", "/tasks", body, compact=True).json()["id"]
    tour.say(
        f"  [blue]→ GET /tasks/{short(long_id)}/events[/blue]  (Server-Sent Events)"
    )
    seen = 0
    with client.stream("GET", f"/tasks/{long_id}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            task = json.loads(line.removeprefix("data: "))
            progress = task.get("progress") or {}
            seen += 1
            if progress:
                done, total = progress["done"], progress["total"]
                tour.say(f"    {task['status']}: {done:,} of {total:,}")
            else:
                tour.say(f"    {task['status']}")
    tour.key(
        f"One stream, {seen} events: each status and progress change, pushed, and "
        "closed at the end (phase 2 keeps progress in RQ's job.meta)."
    )
    tour.wait_for_enter()
