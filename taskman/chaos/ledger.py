"""The ledger: what the chaos client submits, every task the API accepted, what each
must end as, and how they ended."""

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# The contract's mix: 80 % short work, 10 % that fails once then succeeds, 10 % that
# always fails.
MIX = {"echo": 0.6, "sleep": 0.2, "flaky": 0.1, "fail": 0.1}
FINAL = {"succeeded", "failed", "canceled"}


def plan(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """The bodies to POST: the mix, shuffled."""
    types = [t for t, share in MIX.items() for _ in range(round(n * share))]
    types = (types + ["echo"] * n)[:n]
    rng.shuffle(types)
    bodies = []
    for i, kind in enumerate(types):
        body: dict[str, Any] = {"type": kind}
        if kind == "echo":
            body["payload"] = {"value": i}
        elif kind == "sleep":
            body["payload"] = {"seconds": round(rng.uniform(0, 0.2), 3)}
        elif kind == "flaky":
            body["payload"] = {"fail_times": 1}
        else:
            body["payload"] = {"message": f"chaos {i}"}
            body["max_retries"] = rng.randint(0, 3)
        bodies.append(body)
    return bodies


@dataclass
class Accepted:
    """One line of the ledger: a task the API answered 202 (or 200, a replay)."""

    id: str
    type: str
    payload: dict[str, Any]
    max_retries: int
    replayed: bool  # 200: an earlier try of this same submission had landed

    @property
    def expected_status(self) -> str:
        return "failed" if self.type == "fail" else "succeeded"

    @property
    def expected_attempts(self) -> int:
        if self.type == "fail":
            return self.max_retries + 1
        if self.type == "flaky":
            return int(self.payload["fail_times"]) + 1
        return 1


@dataclass
class Kill:
    at: float  # seconds since the run started
    target: str  # "worker-3" (its log is worker-3.log) or "redis"
    pid: int
    # Tasks that may have been running at that moment: a second attempt of one of
    # these is explained by this kill.
    in_flight: list[str] = field(default_factory=list)


@dataclass
class Tally:
    """How the accepted tasks ended, as the API tells it."""

    by_type: dict[str, dict[str, int]]  # type -> final status -> count
    lost: list[str]  # accepted, then 404
    stuck: dict[str, str]  # accepted, never final: id -> last status
    wrong: dict[str, str]  # final, but not what the type promises: id -> why
    fail_exact: int  # fail tasks with attempts == max_retries + 1
    fail_off: dict[str, str]  # fail tasks with any other count: id -> "attempts/max"
    extra_attempts: dict[str, int]  # id -> attempts beyond the type's expected
    worker_lost: int  # final error says the worker died (a kill on the last attempt)
    hidden_deliveries: dict[str, int]  # id -> times dequeued beyond recorded attempts


def tally(
    ledger: list[Accepted], seen: dict[str, dict[str, Any]], deliveries: Counter[str]
) -> Tally:
    """Each accepted task against what its type promises; ``seen`` is its last GET,
    ``deliveries`` how often workers took it off the queue."""
    by_type: dict[str, Counter[str]] = {}
    lost, stuck, wrong = [], {}, {}
    fail_exact, fail_off = 0, {}
    extra: dict[str, int] = {}
    worker_lost = 0
    hidden: dict[str, int] = {}
    for accepted in ledger:
        task = seen.get(accepted.id, {"status": "unread"})
        status = task["status"]
        by_type.setdefault(accepted.type, Counter())[status] += 1
        if status == "lost":
            lost.append(accepted.id)
            continue
        if status not in FINAL:
            stuck[accepted.id] = status
            continue
        why = _wrong(accepted, task)
        if why:
            wrong[accepted.id] = why
        attempts = int(task["attempts"])
        if (task.get("error") or "").startswith("WorkerLost"):
            worker_lost += 1
        if accepted.type == "fail":
            if attempts == accepted.max_retries + 1:
                fail_exact += 1
            else:
                fail_off[accepted.id] = f"{attempts}/{accepted.max_retries}"
        if attempts > accepted.expected_attempts:
            extra[accepted.id] = attempts - accepted.expected_attempts
        if deliveries.get(accepted.id, 0) > attempts:
            hidden[accepted.id] = deliveries[accepted.id] - attempts
    return Tally(
        by_type={kind: dict(counts) for kind, counts in by_type.items()},
        lost=lost,
        stuck=stuck,
        wrong=wrong,
        fail_exact=fail_exact,
        fail_off=fail_off,
        extra_attempts=extra,
        worker_lost=worker_lost,
        hidden_deliveries=hidden,
    )


def _wrong(accepted: Accepted, task: dict[str, Any]) -> str:
    """What is wrong with a final task, or "" if it is what its type promises."""
    status = task["status"]
    if status != accepted.expected_status:
        return f"{accepted.type}: {status} ({task.get('error')})"
    payload, result = accepted.payload, task["result"]
    if accepted.type == "echo" and result != payload["value"]:
        return f"echo: result {result!r}"
    if accepted.type == "sleep" and result != {"slept": payload["seconds"]}:
        return f"sleep: result {result!r}"
    if accepted.type == "flaky" and result != {"attempts": task["attempts"]}:
        return f"flaky: result {result!r} after {task['attempts']} attempts"
    if accepted.type == "fail":
        error = task.get("error") or ""
        if not error.startswith(("RuntimeError: chaos", "WorkerLost")):
            return f"fail: error {error!r}"
    return ""
