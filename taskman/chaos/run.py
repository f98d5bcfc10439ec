"""One chaos run: the client submits while the kills go on, then the verdict."""

import asyncio
import itertools
import json
import random
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from taskman.chaos.cluster import QUEUE, Cluster, running_jobs
from taskman.chaos.ledger import FINAL, Accepted, Kill, plan, tally
from taskman.chaos.result import ChaosResult

# RQ job statuses after which nothing more happens to a job.
RQ_FINAL = {b"finished", b"failed", b"canceled", b"stopped"}

Log = Callable[[str], None]


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
        self.n, self.kill_count = n, kills
        self.rng = rng
        self.concurrency = concurrency
        self.redis_grace, self.redis_down = redis_grace, redis_down
        self.settle_timeout = settle_timeout
        self.run_dir = run_dir
        self.log = log
        self.cluster = Cluster(run_dir, workers)
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

    def run(self) -> ChaosResult:
        with self.cluster.running() as url:
            self.log(
                f"Redis {self.cluster.redis.url}, API {url}, logs in {self.run_dir}"
            )
            self.started = time.monotonic()
            checked = asyncio.run(self.main(url))
            return self.result(checked)

    # --- the run

    async def main(self, api_url: str) -> dict[str, dict[str, Any]]:
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with (
            httpx.AsyncClient(base_url=api_url, timeout=10, limits=limits) as client,
            aioredis.Redis.from_url(
                self.cluster.redis.url, socket_connect_timeout=1
            ) as conn,
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

    async def submit_all(self, client: httpx.AsyncClient) -> None:
        bodies = iter(plan(self.n, self.rng))

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
        ready = [w for w in self.cluster.workers if w.age > 1.5]
        if not ready:
            return False
        victim = self.rng.choice(ready)
        self.cluster.kill_worker(victim)
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
        in_flight = await running_jobs(conn)
        pid = self.cluster.redis.process.pid if self.cluster.redis.process else 0
        self.kills.append(Kill(self.elapsed(), "redis", pid, in_flight))
        # On this thread, not in asyncio.to_thread: Redis asks Linux for SIGTERM
        # when the thread that started it ends (PR_SET_PDEATHSIG follows the
        # thread), and asyncio.run() ends its executor's threads on the way out:
        # the Redis started there died before the run's last reads.
        self.cluster.redis.stop(True)
        self.gate.set()  # submissions now meet the outage: 503, retried
        await asyncio.sleep(self.redis_down)
        self.cluster.redis.start()
        self.recheck = True

    async def report(self) -> None:
        while True:
            await asyncio.sleep(2)
            redis_kills = sum(kill.target == "redis" for kill in self.kills)
            self.log(
                f"{self.elapsed():6.1f}s  accepted {len(self.ledger)}/{self.n}  "
                f"final {self.final_count}  worker kills "
                f"{len(self.kills) - redis_kills}/{self.kill_count}  "
                f"redis kills {redis_kills}  waiting {dict(self.waiting)}"
            )

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

    def result(self, seen: dict[str, dict[str, Any]]) -> ChaosResult:
        found = tally(self.ledger, seen, self.cluster.deliveries())
        in_flight = {i for kill in self.kills for i in kill.in_flight}
        recovery = None
        if self.drained_at is not None:
            last_kill = self.started + (self.kills[-1].at if self.kills else 0.0)
            recovery = max(0.0, self.drained_at - last_kill)
        (self.run_dir / "ledger.json").write_text(
            json.dumps([vars(a) for a in self.ledger], indent=0)
        )
        return ChaosResult(
            **vars(found),
            tasks=self.n,
            workers=self.cluster.worker_count,
            kills=self.kills,
            accepted=len(self.ledger),
            refused=self.refused,
            resubmits=self.resubmits,
            replays=sum(a.replayed for a in self.ledger),
            explained=sorted(set(found.extra_attempts) & in_flight),
            recovery_seconds=recovery,
            submit_seconds=self.submit_seconds,
            wall_seconds=time.monotonic() - self.started,
            orphans=self.cluster.orphans(),
            leftovers=self.cluster.leftovers(),
            stuck_detail=self.cluster.stuck_detail(list(found.stuck)[:20]),
            run_dir=None,
        )
