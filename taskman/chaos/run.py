"""``taskman chaos``: phase 3 as real processes, under fire.

N tasks go in over HTTP while worker processes are SIGKILLed (a replacement starts
each time) and Redis is SIGKILLed and restarted once. Every 202 the client got goes
in a ledger; at the end every accepted task must be final and right: none lost
(404), none stuck, every ``flaky`` succeeded, every ``fail`` failed.
"""

import asyncio
import itertools
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from taskman.phases import PHASES
from taskman.processes import (
    Process,
    alive,
    children,
    send,
    start,
    start_api,
    start_time,
    stop,
    stop_tree,
    taskman_command,
    wait_healthy,
)
from taskman.redis_server import EmbeddedRedis, free_port

PHASE = 3  # the phase under fire
QUEUE = "taskman"
# The contract's mix: 80 % short work, 10 % that fails once then succeeds, 10 % that
# always fails.
MIX = {"echo": 0.6, "sleep": 0.2, "flaky": 0.1, "fail": 0.1}
FINAL = {"succeeded", "failed", "canceled"}
# Seconds from the last kill until every accepted task is final.
RECOVERY_TARGET = 30
# RQ job statuses after which nothing more happens to a job.
RQ_FINAL = {b"finished", b"failed", b"canceled", b"stopped"}
# What a worker logs when it takes a job off the queue (RQ's own INFO line).
DEQUEUED = re.compile(r"Worker (\w+): [^:]+: taskman \w+ task \(([0-9a-f]{32})\)")

Log = Callable[[str], None]


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
class ChaosResult:
    tasks: int
    workers: int
    kills: list[Kill]
    accepted: int
    by_type: dict[str, dict[str, int]]  # type -> final status -> count
    lost: list[str]  # accepted, then 404
    stuck: dict[str, str]  # accepted, never final: id -> last status
    wrong: dict[str, str]  # final, but not what the type promises: id -> why
    refused: int  # submissions that never got a 202 (the client gave up)
    resubmits: int  # POST tries beyond the first (503s, dropped connections)
    replays: int  # submissions answered 200: an earlier try had landed
    fail_exact: int  # fail tasks with attempts == max_retries + 1
    fail_off: dict[str, str]  # fail tasks with any other count: id -> "attempts/max"
    extra_attempts: dict[str, int]  # id -> attempts beyond the type's expected
    explained: list[str]  # of those, the ones in flight at a kill
    worker_lost: int  # final error says the worker died (a kill on the last attempt)
    hidden_deliveries: dict[str, int]  # id -> times dequeued beyond recorded attempts
    recovery_seconds: float | None  # last kill -> every accepted task final
    submit_seconds: float
    wall_seconds: float
    orphans: int  # processes that outlived the worker killed under them
    leftovers: dict[str, int]  # what is still in RQ's lists at the end
    stuck_detail: dict[str, dict[str, Any]]
    run_dir: str | None  # kept (logs, ledger) when something went wrong

    @property
    def worker_kills(self) -> int:
        return sum(kill.target != "redis" for kill in self.kills)

    @property
    def redis_kills(self) -> int:
        return sum(kill.target == "redis" for kill in self.kills)

    @property
    def flaky(self) -> tuple[int, int]:
        outcomes = self.by_type.get("flaky", {})
        return outcomes.get("succeeded", 0), sum(outcomes.values())

    @property
    def fail(self) -> tuple[int, int]:
        outcomes = self.by_type.get("fail", {})
        return outcomes.get("failed", 0), sum(outcomes.values())

    @property
    def unexplained(self) -> list[str]:
        return sorted(set(self.extra_attempts) - set(self.explained))

    @property
    def ok(self) -> bool:
        flaky_ok, flaky_all = self.flaky
        fail_ok, fail_all = self.fail
        return (
            not self.lost
            and not self.stuck
            and not self.wrong
            and flaky_ok == flaky_all
            and fail_ok == fail_all
            and self.recovery_seconds is not None
        )


def run_chaos(
    n: int,
    kills: int,
    *,
    workers: int = 3,
    seed: int | None = None,
    concurrency: int = 16,
    redis_grace: float = 1.5,
    redis_down: float = 1.0,
    settle_timeout: float = 120.0,
    keep: bool = False,
    log: Log | None = None,
) -> ChaosResult:
    """Submit ``n`` tasks to phase 3 while SIGKILLing ``kills`` workers and Redis once."""
    if n < 10 or kills < 0 or workers < 2:
        raise ValueError("need n >= 10 tasks, kills >= 0 and workers >= 2")
    run_dir = Path(tempfile.mkdtemp(prefix="taskman-chaos-"))
    chaos = _Chaos(
        n=n,
        kills=kills,
        workers=workers,
        rng=random.Random(seed),
        concurrency=concurrency,
        redis_grace=redis_grace,
        redis_down=redis_down,
        settle_timeout=settle_timeout,
        run_dir=run_dir,
        log=log or (lambda _: None),
    )
    result = chaos.run()
    if result.ok and not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        result.run_dir = str(run_dir)
        (run_dir / "result.json").write_text(json.dumps(asdict(result), indent=1))
    return result


class _Chaos:
    def __init__(
        self,
        n: int,
        kills: int,
        workers: int,
        rng: random.Random,
        concurrency: int,
        redis_grace: float,
        redis_down: float,
        settle_timeout: float,
        run_dir: Path,
        log: Log,
    ) -> None:
        self.n, self.kill_count, self.worker_count = n, kills, workers
        self.rng = rng
        self.concurrency = concurrency
        self.redis_grace, self.redis_down = redis_grace, redis_down
        self.settle_timeout = settle_timeout
        self.run_dir = run_dir
        self.log = log
        self.redis = EmbeddedRedis(run_dir / "redis", port=free_port())
        self.workers: list[_Worker] = []
        self.retired: list[_Worker] = []
        self.ledger: list[Accepted] = []
        self.kills: list[Kill] = []
        self.refused = self.resubmits = 0
        self.inflight = 0
        self.final_count = 0
        self.waiting: Counter[str] = Counter()  # RQ status of the unfinished
        self.progress_at = 0.0
        self.recheck = False
        self.gate = asyncio.Event()  # cleared while Redis is about to be killed
        self.submitted = asyncio.Event()
        self.kills_done = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained_at: float | None = None
        self.submit_seconds = 0.0
        self.started = time.monotonic()

    # --- the processes

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TASKMAN_REDIS_URL": self.redis.url,
            "TASKMAN_QUEUE_NAME": QUEUE,
            "TASKMAN_MAX_RETRIES": "3",
            # Short retries and heartbeats: a run of minutes, not hours.
            "TASKMAN_RETRY_BACKOFF": "0.2",
            "TASKMAN_JOB_HEARTBEAT_SECONDS": "4",
            # The chaos client is one client: it must not be rate-limited.
            "TASKMAN_RATE_LIMIT_SUBMIT": "1000000/second",
            "TASKMAN_RATE_LIMIT_READ": "1000000/second",
            # INFO: each worker logs every job it dequeues, the ledger of deliveries.
            "TASKMAN_LOG_LEVEL": "INFO",
        }

    def start_worker(self) -> None:
        number = len(self.workers) + len(self.retired) + 1
        self.workers.append(_Worker(number, self.env(), self.run_dir))

    def run(self) -> ChaosResult:
        with ExitStack() as stack:
            self.redis.start()
            stack.callback(self.redis.stop)
            # The phase-3 API under uvicorn, as it is served; in a directory of
            # ours, so no stray .env file from wherever we were started is read.
            api, url = start_api(
                PHASES[PHASE],
                self.env(),
                cwd=self.run_dir,
                log=self.run_dir / "api.log",
            )
            stack.callback(stop, api)
            for _ in range(self.worker_count):
                self.start_worker()
            stack.callback(self.stop_workers)
            wait_healthy(url, api)
            self.wait_for_workers()
            self.log(f"Redis {self.redis.url}, API {url}, logs in {self.run_dir}")
            self.started = time.monotonic()
            checked = asyncio.run(self.main(url))
            return self.result(checked, self.orphans(), self.leftovers())

    def wait_for_workers(self, timeout: float = 60) -> None:
        # Any: redis-py's sync methods are typed as "maybe awaitable".
        connection: Any = redis.Redis.from_url(self.redis.url)
        deadline = time.monotonic() + timeout
        try:
            while connection.scard(f"rq:workers:{QUEUE}") < self.worker_count:
                if time.monotonic() > deadline:
                    raise TimeoutError("the workers never registered")
                time.sleep(0.1)
        finally:
            connection.close()

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()

    def orphans(self) -> int:
        """Children of killed workers still alive (RQ's scheduler is a forked child:
        a SIGKILL of the worker leaves it running). Ours: we stop them."""
        left = [
            (pid, at) for w in self.retired for pid, at in w.children if alive(pid, at)
        ]
        for pid, at in left:
            send(pid, signal.SIGTERM, at)
        return len(left)

    def leftovers(self) -> dict[str, int]:
        connection = redis.Redis.from_url(self.redis.url)
        try:
            with connection.pipeline(transaction=False) as pipe:
                pipe.llen(f"rq:queue:{QUEUE}")
                pipe.llen(f"rq:queue:{QUEUE}:intermediate")
                pipe.zcard(f"rq:wip:{QUEUE}")
                pipe.zcard(f"rq:scheduled:{QUEUE}")
                counts = pipe.execute()
        finally:
            connection.close()
        names = ("queued", "intermediate", "started", "scheduled")
        return dict(zip(names, counts, strict=True))

    # --- the run

    async def main(self, api_url: str) -> dict[str, dict[str, Any]]:
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with (
            httpx.AsyncClient(base_url=api_url, timeout=10, limits=limits) as client,
            aioredis.Redis.from_url(self.redis.url, socket_connect_timeout=1) as conn,
        ):
            self.gate.set()
            tasks = [
                asyncio.create_task(self.monitor(conn)),
                asyncio.create_task(self.chaos(conn)),
                asyncio.create_task(self.report()),
            ]
            try:
                await self.submit_all(client)
                await self.kills_done.wait()
                try:
                    await asyncio.wait_for(
                        self.drained.wait(),
                        max(0.0, self.settle_timeout + self.since_last_kill()),
                    )
                except TimeoutError:
                    self.log("settle timeout: some tasks never finished")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            return await self.check(client)

    def since_last_kill(self) -> float:
        """Seconds from now back to the last kill (negative: it is in the past)."""
        last = self.kills[-1].at if self.kills else 0.0
        return last - self.elapsed()

    def plan(self) -> list[dict[str, Any]]:
        types = [t for t, share in MIX.items() for _ in range(round(self.n * share))]
        types = (types + ["echo"] * self.n)[: self.n]
        self.rng.shuffle(types)
        bodies = []
        for i, kind in enumerate(types):
            body: dict[str, Any] = {"type": kind}
            if kind == "echo":
                body["payload"] = {"value": i}
            elif kind == "sleep":
                body["payload"] = {"seconds": round(self.rng.uniform(0, 0.2), 3)}
            elif kind == "flaky":
                body["payload"] = {"fail_times": 1}
            else:
                body["payload"] = {"message": f"chaos {i}"}
                body["max_retries"] = self.rng.randint(0, 3)
            bodies.append(body)
        return bodies

    async def submit_all(self, client: httpx.AsyncClient) -> None:
        bodies = iter(self.plan())

        async def lane() -> None:
            for body in bodies:
                await self.submit(client, body)

        started = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(self.concurrency)))
        self.submit_seconds = time.monotonic() - started
        self.submitted.set()

    async def submit(self, client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        """POST until a 202/200; every retry carries the same Idempotency-Key, so a
        try that landed before its answer was lost is not queued twice."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        deadline = time.monotonic() + 60
        for tries in itertools.count():
            await self.gate.wait()
            if tries:
                self.resubmits += 1
            self.inflight += 1
            try:
                response = await client.post("/tasks", json=body, headers=headers)
            except httpx.TransportError:
                response = None
            finally:
                self.inflight -= 1
            if response is not None and response.status_code in (200, 202):
                task = response.json()
                self.ledger.append(
                    Accepted(
                        id=task["id"],
                        type=task["type"],
                        payload=task["payload"],
                        max_retries=task["max_retries"],
                        replayed=response.status_code == 200,
                    )
                )
                return
            retryable = response is None or response.status_code in (429, 503)
            if not retryable or time.monotonic() > deadline:
                self.refused += 1
                status = response.status_code if response is not None else "no answer"
                self.log(f"submission refused ({status}): {body}")
                return
            await asyncio.sleep(0.1)

    async def monitor(self, conn: aioredis.Redis) -> None:
        """Watches progress straight from Redis to pace the kills and to see when
        everything is final (the API checks it after). RQ's registries give a
        cheap count; each unfinished job's own status, read every 2 s and when
        the count says done, gives the exact picture."""
        final: set[str] = set()
        checked = 0.0
        while True:
            await asyncio.sleep(0.25)
            if self.recheck:  # Redis restarted: what it kept is what counts
                final.clear()
                self.recheck = False
            try:
                async with conn.pipeline(transaction=False) as pipe:
                    for registry in ("finished", "failed", "canceled"):
                        pipe.zcard(f"rq:{registry}:{QUEUE}")
                    count = sum(await pipe.execute())
                now = time.monotonic()
                if count != self.final_count:
                    self.final_count, self.progress_at = count, now
                if count < len(self.ledger) and now - checked < 2:
                    continue
                checked = now
                ids = [task.id for task in self.ledger if task.id not in final]
                async with conn.pipeline(transaction=False) as pipe:
                    for task_id in ids:
                        pipe.hget(f"rq:job:{task_id}", "status")
                    statuses = await pipe.execute()
            except (redis.RedisError, OSError):
                continue
            final.update(i for i, s in zip(ids, statuses, strict=True) if s in RQ_FINAL)
            self.waiting = Counter(
                (s or b"missing").decode() for s in statuses if s not in RQ_FINAL
            )
            everything = self.submitted.is_set() and self.kills_done.is_set()
            if everything and len(final) == len(self.ledger):
                self.drained_at = now
                self.drained.set()
                return

    async def chaos(self, conn: aioredis.Redis) -> None:
        """Kill workers as the run progresses (every 1/(K+1) of the tasks finished),
        and Redis once, half-way through the submissions."""
        thresholds = [(i + 1) / (self.kill_count + 1) for i in range(self.kill_count)]
        redis_killed = False
        last_kill = time.monotonic()
        self.progress_at = time.monotonic()
        while thresholds or not redis_killed:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if not redis_killed and (
                len(self.ledger) >= self.n // 2 or self.submitted.is_set()
            ):
                await self.kill_redis(conn)
                redis_killed, last_kill = True, time.monotonic()
                continue
            if not thresholds or now - last_kill < 0.5:
                continue
            # Stalled (nothing finished for 10 s): kill anyway, the run goes on.
            stalled = now - self.progress_at > 10
            due = self.final_count >= thresholds[0] * self.n or stalled
            if due and self.kill_worker():
                thresholds.pop(0)
                last_kill = now
        self.kills_done.set()

    def kill_worker(self) -> bool:
        ready = [w for w in self.workers if w.age > 1.5]
        if not ready:
            return False
        victim = self.rng.choice(ready)
        victim.kill()
        self.workers.remove(victim)
        self.retired.append(victim)
        self.start_worker()
        in_flight = [victim.last_dequeued] if victim.last_dequeued else []
        self.kills.append(Kill(self.elapsed(), victim.name, victim.pid, in_flight))
        return True

    async def kill_redis(self, conn: aioredis.Redis) -> None:
        # Pause the client and let what it sent land: with appendfsync everysec a
        # 202 from the last second before a crash may be lost (docs/phase2.md).
        self.gate.clear()
        while self.inflight:
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.redis_grace)
        in_flight = await _running_jobs(conn)
        pid = self.redis.process.pid if self.redis.process else 0
        self.kills.append(Kill(self.elapsed(), "redis", pid, in_flight))
        await asyncio.to_thread(self.redis.stop, True)
        self.gate.set()  # submissions now meet the outage: 503, retried
        await asyncio.sleep(self.redis_down)
        await asyncio.to_thread(self.redis.start)
        self.recheck = True

    async def report(self) -> None:
        while True:
            await asyncio.sleep(2)
            self.log(
                f"{self.elapsed():6.1f}s  accepted {len(self.ledger)}/{self.n}  "
                f"final {self.final_count}  worker kills {self.worker_kills()}"
                f"/{self.kill_count}  redis kills {self.redis_kills()}  "
                f"waiting {dict(self.waiting)}"
            )

    def worker_kills(self) -> int:
        return sum(kill.target != "redis" for kill in self.kills)

    def redis_kills(self) -> int:
        return sum(kill.target == "redis" for kill in self.kills)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # --- the verdict

    async def check(self, client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
        """GET every accepted task through the API, polling the unfinished ones
        until the settle deadline: the client's view decides, not Redis's."""
        # Redis said all final: the API should agree at once (its cache may lag
        # by a second). Otherwise the settle time is up: one look, a short grace.
        deadline = time.monotonic() + (30 if self.drained.is_set() else 5)
        seen: dict[str, dict[str, Any]] = {}
        pending = [task.id for task in self.ledger]
        limit = asyncio.Semaphore(self.concurrency)

        async def read(task_id: str) -> None:
            async with limit:
                for _ in range(50):
                    try:
                        response = await client.get(f"/tasks/{task_id}")
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
                        continue
                    if response.status_code == 404:
                        seen[task_id] = {"status": "lost"}
                        return
                    if response.status_code == 200:
                        seen[task_id] = response.json()
                        return
                    await asyncio.sleep(0.1)

        passes = 0
        while pending:
            passes += 1
            await asyncio.gather(*(read(task_id) for task_id in pending))
            pending = [
                i
                for i in pending
                if seen.get(i, {}).get("status") not in FINAL | {"lost"}
            ]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if passes > 1 and not pending:
            # Redis said final before the API did: the API's moment is the one.
            self.drained_at = time.monotonic()
        elif pending:
            self.drained_at = None
        return seen

    def result(
        self,
        seen: dict[str, dict[str, Any]],
        orphans: int,
        leftovers: dict[str, int],
    ) -> ChaosResult:
        by_type: dict[str, Counter[str]] = {}
        lost, stuck, wrong = [], {}, {}
        fail_exact, fail_off = 0, {}
        extra: dict[str, int] = {}
        worker_lost = 0
        deliveries = self.deliveries()
        hidden: dict[str, int] = {}
        for accepted in self.ledger:
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
        in_flight = {i for kill in self.kills for i in kill.in_flight}
        recovery = None
        if self.drained_at is not None:
            last_kill = self.started + (self.kills[-1].at if self.kills else 0.0)
            recovery = max(0.0, self.drained_at - last_kill)
        (self.run_dir / "ledger.json").write_text(
            json.dumps([vars(a) for a in self.ledger], indent=0)
        )
        return ChaosResult(
            tasks=self.n,
            workers=self.worker_count,
            kills=self.kills,
            accepted=len(self.ledger),
            by_type={kind: dict(counts) for kind, counts in by_type.items()},
            lost=lost,
            stuck=stuck,
            wrong=wrong,
            refused=self.refused,
            resubmits=self.resubmits,
            replays=sum(a.replayed for a in self.ledger),
            fail_exact=fail_exact,
            fail_off=fail_off,
            extra_attempts=extra,
            explained=sorted(set(extra) & in_flight),
            worker_lost=worker_lost,
            hidden_deliveries=hidden,
            recovery_seconds=recovery,
            submit_seconds=self.submit_seconds,
            wall_seconds=time.monotonic() - self.started,
            orphans=orphans,
            leftovers=leftovers,
            stuck_detail=self.stuck_detail(list(stuck)[:20]),
            run_dir=None,
        )

    def deliveries(self) -> Counter[str]:
        """How many times any worker took each task off the queue, from their logs."""
        counts: Counter[str] = Counter()
        for worker in self.workers + self.retired:
            for match in DEQUEUED.finditer(worker.log_text()):
                counts[match[2]] += 1
        return counts

    def stuck_detail(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Where RQ has each stuck task: its hash fields and the lists it is in."""
        if not ids:
            return {}
        connection: Any = redis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            queued = set(connection.lrange(f"rq:queue:{QUEUE}", 0, -1))
            intermediate = set(
                connection.lrange(f"rq:queue:{QUEUE}:intermediate", 0, -1)
            )
            started = {
                m.split(":")[0] for m in connection.zrange(f"rq:wip:{QUEUE}", 0, -1)
            }
            scheduled = set(connection.zrange(f"rq:scheduled:{QUEUE}", 0, -1))
            detail = {}
            for task_id in ids:
                fields = connection.hmget(
                    f"rq:job:{task_id}",
                    ["status", "attempts", "retries_left", "worker_name"],
                )
                places = [
                    name
                    for name, members in (
                        ("queue", queued),
                        ("intermediate", intermediate),
                        ("wip", started),
                        ("scheduled", scheduled),
                    )
                    if task_id in members
                ]
                detail[task_id] = {
                    "status": fields[0],
                    "attempts": fields[1],
                    "retries_left": fields[2],
                    "worker": fields[3],
                    "in": places,
                }
            detail["_locks"] = {
                key: connection.ttl(key)
                for key in connection.keys("rq:*lock*")
                + connection.keys("rq:clean_registries:*")
            }
            return detail
        finally:
            connection.close()


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


async def _running_jobs(conn: aioredis.Redis) -> list[str]:
    """Jobs a worker holds right now: started, or dequeued and about to start."""
    try:
        async with conn.pipeline(transaction=False) as pipe:
            pipe.zrange(f"rq:wip:{QUEUE}", 0, -1)
            pipe.lrange(f"rq:queue:{QUEUE}:intermediate", 0, -1)
            started, dequeued = await pipe.execute()
    except redis.RedisError:
        return []
    return [m.decode().split(":")[0] for m in started] + [m.decode() for m in dequeued]


class _Worker:
    """One ``taskman worker --phase 3`` process, its log in the run directory."""

    def __init__(self, number: int, env: dict[str, str], run_dir: Path) -> None:
        self.name = f"worker-{number}"
        self.path = run_dir / f"{self.name}.log"
        self.process: Process = start(
            taskman_command("worker", "--phase", str(PHASE)),
            env=env,
            cwd=run_dir,
            log=self.path,
        )
        self.pid = self.process.pid
        self.born = time.monotonic()
        # Its children when it was killed, as (pid, start time): pids are reused.
        self.children: list[tuple[int, int]] = []

    @property
    def age(self) -> float:
        return time.monotonic() - self.born

    @property
    def last_dequeued(self) -> str | None:
        found = DEQUEUED.findall(self.log_text())
        return found[-1][1] if found else None

    def log_text(self) -> str:
        return self.path.read_text(errors="replace")

    def kill(self) -> None:
        self.children = [
            (pid, at)
            for pid in children(self.pid)
            if (at := start_time(pid)) is not None
        ]
        stop(self.process, kill=True)

    def stop(self) -> None:
        """RQ's warm shutdown (SIGTERM); SIGKILL if it takes too long, and of what
        it leaves running."""
        stop_tree(self.process, timeout=10)


def print_summary(result: ChaosResult, console: Console | None = None) -> None:
    """The run's figures as a table, then what went wrong, if anything."""
    console = console or Console()
    verdict = "[green]PASS[/green]" if result.ok else "[red]FAIL[/red]"
    table = Table(title=f"taskman chaos: {verdict}", show_header=False)
    table.add_column("what")
    table.add_column("figure", justify="right")
    flaky_ok, flaky_all = result.flaky
    fail_ok, fail_all = result.fail
    if result.recovery_seconds is None:
        recovery = "[red]never[/red]"
    else:
        recovery = f"{result.recovery_seconds:.1f} s"
        if result.recovery_seconds > RECOVERY_TARGET:
            recovery = f"[red]{recovery}[/red] (target {RECOVERY_TARGET} s)"
    rows = [
        ("tasks planned / accepted", f"{result.tasks} / {result.accepted}"),
        ("workers", str(result.workers)),
        (
            "worker SIGKILLs / Redis SIGKILLs",
            f"{result.worker_kills} / {result.redis_kills}",
        ),
        ("lost (accepted, then 404)", _count(len(result.lost))),
        ("stuck (never final)", _count(len(result.stuck))),
        ("wrong outcome", _count(len(result.wrong))),
        ("flaky succeeded", f"{flaky_ok} / {flaky_all}"),
        ("fail failed", f"{fail_ok} / {fail_all}"),
        ("fail with attempts == max_retries + 1", f"{result.fail_exact} / {fail_all}"),
        ("tasks with extra attempts", str(len(result.extra_attempts))),
        ("  of which in flight at a kill", str(len(result.explained))),
        ("  unexplained", _count(len(result.unexplained))),
        ("final error WorkerLost", str(result.worker_lost)),
        ("dequeued more often than started", str(len(result.hidden_deliveries))),
        ("submissions retried (same key)", str(result.resubmits)),
        ("  answered 200 (had landed)", str(result.replays)),
        ("submissions refused", _count(result.refused)),
        ("orphaned processes", str(result.orphans)),
        ("recovery after the last kill", recovery),
        ("submit time", f"{result.submit_seconds:.1f} s"),
        ("wall time", f"{result.wall_seconds:.1f} s"),
    ]
    for what, figure in rows:
        table.add_row(what, figure)
    console.print(table)
    statuses = Table(title="final status by type")
    statuses.add_column("type")
    for status in ("succeeded", "failed", "other"):
        statuses.add_column(status, justify="right")
    for kind, outcomes in sorted(result.by_type.items()):
        other = sum(v for k, v in outcomes.items() if k not in ("succeeded", "failed"))
        statuses.add_row(
            kind,
            str(outcomes.get("succeeded", 0)),
            str(outcomes.get("failed", 0)),
            str(other),
        )
    console.print(statuses)
    kills = ", ".join(f"{k.target}@{k.at:.1f}s" for k in result.kills)
    console.print(f"[dim]kills: {kills}[/dim]")
    for title, items in (
        ("lost", {i: "404" for i in result.lost}),
        ("stuck", result.stuck),
        ("wrong", result.wrong),
        ("fail tasks with attempts != max_retries + 1", result.fail_off),
        ("unexplained extra attempts", {i: "" for i in result.unexplained}),
    ):
        if items:
            console.print(f"[red]{title}[/red] ({len(items)}):")
            for task_id, why in list(items.items())[:10]:
                console.print(f"  {task_id} {why}")
    if result.stuck_detail:
        console.print_json(data=result.stuck_detail)
    if any(result.leftovers.values()):
        console.print(f"[yellow]left in RQ's lists:[/yellow] {result.leftovers}")
    if result.run_dir:
        console.print(f"[dim]logs and ledger: {result.run_dir}[/dim]")


def _count(value: int) -> str:
    return f"[red]{value}[/red]" if value else "0"
