"""Phase 2 of the tour: a queue in Redis that outlives every process."""

import time
from pathlib import Path

import httpx
import redis

from taskman.demo.narration import DemoError, Tour, short
from taskman.demo.phase1 import cancel, submit_mix
from taskman.demo.servers import Processes, base_env, serve, show_processes
from taskman.processes import Process
from taskman.redis_server import free_port


def phase2(tour: Tour, workdir: Path) -> None:
    pace = tour.pace
    tour.phase(
        2,
        "a queue that outlives every process",
        "The API writes each task to Redis as an RQ job and answers 202; separate "
        "worker processes take the jobs and run them. The API, a worker, even Redis "
        "can die: what got a 202 is still there afterwards.",
    )
    port = free_port()
    with Processes(tour.console, workdir / "logs" / "phase2") as procs:
        tour.step(
            "Start Redis, the API and two workers",
            "This time we start each piece ourselves, to be able to kill one: Redis "
            "(append-only file on), the API alone (--workers 0), and two `taskman "
            "worker` processes.",
            f"TASKMAN_JOB_HEARTBEAT_SECONDS={pace.heartbeat} (default 10): a worker "
            f"that dies mid-task is noticed after ~{pace.heartbeat} s, so step 2.5 "
            "takes seconds, not half a minute.",
        )
        redis_server = procs.start_redis(workdir / "phase2" / "redis")
        redis_url = redis_server.url
        shown = {
            "TASKMAN_REDIS_URL": redis_url,
            "TASKMAN_JOB_HEARTBEAT_SECONDS": str(pace.heartbeat),
            "TASKMAN_RETRY_BACKOFF": pace.retry_backoff,
        }
        env = {**base_env(), **shown, "TASKMAN_DATA_DIR": str(workdir / "phase2")}
        tour.say(f"[dim]redis-server on {redis_url}[/dim]")
        api = serve(tour, procs, "api", 2, port, 0, env, shown)
        tour.shell(shown, ["worker", "--phase", "2"])
        tour.say("[dim](twice)[/dim]")
        workers = [
            procs.start(f"worker-{n}", ["worker", "--phase", "2"], env) for n in (1, 2)
        ]
        assert redis_server.process is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 30
            while client.get("/health").json().get("workers", 0) < 2:
                if time.monotonic() > deadline:
                    raise DemoError("the workers did not register with Redis")
                time.sleep(0.1)
            show_processes(
                tour,
                [("Redis", redis_server.process.pid), ("API", api.pid)]
                + [(f"worker {n}", w.pid) for n, w in enumerate(workers, 1)],
            )
            tour.call(client, "GET", "/health")
            tour.wait_for_enter()

            tour.step(
                "The same mix, run by the workers",
                "The same requests as in phase 1, plus a flaky task and a fail "
                "without retries.",
            )
            mix = [
                *submit_mix(tour, client),
                tour.submit(client, "flaky", {"fail_times": 2}),
                tour.submit(client, "fail", {"message": "boom"}, max_retries=0),
            ]
            tour.watch(client, mix)
            tour.notice(
                "same answers as phase 1 (the routes are the same file). The work "
                "ran in the workers, and flaky's retries went back through Redis: "
                "a retry that has a delay waits in RQ's scheduled registry."
            )
            tour.wait_for_enter()

            cancel(
                tour,
                client,
                " DELETE marks the job canceled in Redis; the task checks that "
                "every ~50 ms in its worker, and stops.",
            )

            tour.step(
                "Restart the API while tasks wait",
                "Four sleeps for two workers: two run, two wait, in Redis this time.",
            )
            kept = [
                tour.submit(client, "sleep", {"seconds": pace.sleep}, compact=True)
                for _ in range(4)
            ]
            time.sleep(0.3)
            tour.call(client, "GET", "/health")
            tour.say(f"[bold]$ kill -TERM {api.pid}[/bold]")
            procs.stop(api)
            try:
                client.get("/health")
            except httpx.TransportError as error:
                tour.say(f"  [blue]→ GET /health[/blue]\n  ← [red]{error}[/red]")
            tour.say(
                "The API is down, the workers are not: they keep taking jobs from "
                "Redis. Start the API again:"
            )
            api = serve(tour, procs, "api-again", 2, port, 0, env, shown)
            tour.watch(client, kept)
            done = sum(w.task["status"] == "succeeded" for w in kept)
            tour.key(f"Kept: {done} of {len(kept)} tasks survived the API restart.")
            if done != len(kept):
                raise DemoError("phase 2 was expected to keep every task")
            tour.wait_for_enter()

            kill_worker(tour, client, procs, workers, redis_url)


def kill_worker(
    tour: Tour,
    client: httpx.Client,
    procs: Processes,
    workers: list[Process],
    redis_url: str,
) -> None:
    pace = tour.pace
    tour.step(
        "Kill a worker mid-task",
        f"A {pace.doomed_sleep:g}-second sleep; while it runs, we kill -9 the worker "
        "running it.",
    )
    doomed = tour.submit(client, "sleep", {"seconds": pace.doomed_sleep})
    tour.wait_for_status(client, doomed, "running")
    connection = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        job_key = f"rq:job:{doomed.task['id']}"
        name = connection.hget(job_key, "worker_name")
        pid = connection.hget(f"rq:worker:{name}", "pid")
    finally:
        connection.close()
    victim = next((w for w in workers if str(w.pid) == str(pid)), None)
    if victim is None:
        raise DemoError(f"no worker of ours runs the task (pid {pid})")
    tour.say(
        f"RQ records who took the job: [bold]{job_key}[/bold] worker_name={name}, "
        f"and [bold]rq:worker:{name}[/bold] pid={pid}: our worker "
        f"{workers.index(victim) + 1}."
    )
    tour.say(f"[bold]$ kill -KILL {pid}[/bold]")
    survivors = procs.kill(victim)
    killed_at = time.monotonic()
    if survivors:
        tour.say(
            f"[dim](pid {', '.join(map(str, sorted(survivors)))}, its RQ scheduler, "
            "a forked child, outlives a kill -9 of its parent; the demo stops it "
            "at the end.)[/dim]"
        )
    beat = pace.heartbeat
    tour.say(
        "For a few seconds the task still reads running: nobody knows yet that its "
        f"worker is dead. Once the job's heartbeat ({beat} s) has expired, the other "
        f"worker's clean-up (every {max(1, beat // 2)} s) finds it and retries it "
        "(it has retries left): retrying, then running again, from the start."
    )
    tour.watch(client, [doomed], timeout=120)
    task = doomed.task
    finished = time.monotonic() - killed_at
    if task["status"] != "succeeded" or task["attempts"] < 2:
        raise DemoError(
            f"the task ended {task['status']} on attempt {task['attempts']}"
        )
    noticed = next(
        (
            at - killed_at
            for seen, at in zip(doomed.seen, doomed.changed_at, strict=True)
            if seen != "running#1"
        ),
        finished,
    )
    tour.say(
        f"The lost attempt was noticed {noticed:.1f} s after the kill; attempt 2 "
        f"then ran the whole {pace.doomed_sleep:g} s sleep again."
    )
    tour.key(
        f"Recovered: task {short(task['id'])} succeeded on attempt {task['attempts']}, "
        f"{finished:.1f} s after its worker was killed."
    )
    tour.notice(
        "delivery is at least once: a task can run twice, so task functions should "
        "be idempotent (ours are deterministic)."
    )
    tour.wait_for_enter()
