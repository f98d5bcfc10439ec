"""Phase 3 of the tour: rate limits, the result cache, the dashboard, metrics."""

import secrets
import time
from pathlib import Path

import httpx
from rich.markup import escape
from rich.panel import Panel

from taskman.demo.narration import FINISHED, DemoError, Tour, Watched, answer
from taskman.demo.servers import Processes, base_env, role, serve, show_processes
from taskman.processes import descendants
from taskman.redis_server import free_port


def phase3(tour: Tour, workdir: Path) -> None:
    tour.phase(
        3,
        "production: protection, visibility, speed",
        "Phase 2 plus what a shared service needs: per-client rate limits, the "
        "rq-dashboard behind a password, a result cache for polling clients, and "
        "metrics. Each is a layer around the same app and the same workers.",
    )
    password = secrets.token_urlsafe(12)
    shown = {
        "TASKMAN_RATE_LIMIT_SUBMIT": "5/second",
        "TASKMAN_DASHBOARD_PASSWORD": password,
    }
    env = {
        **base_env(),
        **shown,
        "TASKMAN_REDIS_URL": "",
        "TASKMAN_DATA_DIR": str(workdir / "phase3"),
        "TASKMAN_RETRY_BACKOFF": tour.pace.retry_backoff,
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Processes(tour.console, workdir / "logs" / "phase3") as procs:
        tour.step(
            "Start phase 3",
            "This time `taskman serve` starts its own embedded Redis and two "
            "workers. TASKMAN_RATE_LIMIT_SUBMIT=5/second (default 20/second) makes "
            "the limit easy to reach; the dashboard password is made up for this "
            "run.",
        )
        server = serve(tour, procs, "serve-3", 3, port, 2, env, shown)
        show_processes(
            tour,
            [("serve (API)", server.pid)]
            + [(role(pid, server.pid), pid) for pid in sorted(descendants(server.pid))],
        )
        with httpx.Client(base_url=url, timeout=10) as client:
            tour.call(client, "GET", "/health")
            tour.say("Every task request now carries its budget:")
            first = tour.submit(
                client,
                "echo",
                {"value": "hello"},
                show=("RateLimit-Policy", "RateLimit"),
            )
            tour.notice(
                'RateLimit-Policy: 5 requests ("q") per 1-second window ("w"). '
                'RateLimit: what is left ("r") and seconds until the window '
                'resets ("t").'
            )
            tour.wait_for_enter()

            rate_limit(tour, client)
            cache(tour, client, first)
            dashboard(tour, client, url, password)


def rate_limit(tour: Tour, client: httpx.Client) -> None:
    tour.step(
        "Hit the rate limit",
        "Ten POSTs as fast as we can; the limit is 5 per second per client.",
    )
    time.sleep(1.1)  # a fresh window, whatever came before
    limited = None
    for n in range(10):
        response = tour.call(
            client,
            "POST",
            "/tasks",
            {"type": "echo", "payload": {"value": n}},
            show=("RateLimit",) if n < 5 else (),
            quiet=True,
        )
        tour.say(
            f"  [blue]→ POST /tasks #{n + 1}[/blue]  ← {answer(response)}  "
            f"[dim]RateLimit: {escape(response.headers.get('RateLimit', '-'))}[/dim]"
        )
        if response.status_code == 429:
            limited = response
            break
    if limited is None:
        raise DemoError("ten POSTs in a row were never refused")
    tour.say("The refusal in full:")
    for name in (
        "Retry-After",
        "RateLimit-Policy",
        "RateLimit",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    ):
        tour.say(f"      [dim]{name}:[/dim] {escape(limited.headers.get(name, '-'))}")
    retry_after = int(limited.headers["Retry-After"])
    tour.key(
        f"429 Too Many Requests after {n} tasks in a second; Retry-After: {retry_after}"
    )
    tour.say(f"We wait the {retry_after} s it asks for, and try again:")
    time.sleep(retry_after)
    tour.call(
        client,
        "POST",
        "/tasks",
        {"type": "echo", "payload": {"value": "again"}},
        show=("RateLimit",),
    )
    tour.notice(
        "the counts live in Redis, so several API processes share one budget; "
        "/health, /metrics and /dashboard are never limited."
    )
    tour.wait_for_enter()


def cache(tour: Tour, client: httpx.Client, first: Watched) -> None:
    pace = tour.pace
    tour.step(
        "The result cache: X-Cache and 304",
        "Clients poll GET /tasks/{id}. A finished task no longer changes, so phase "
        "3 keeps it in a cache (this process's memory, then Redis). We poll a short "
        "sleep and watch the X-Cache header:",
    )
    sleeper = tour.submit(client, "sleep", {"seconds": pace.cached_sleep})
    path = f"/tasks/{sleeper.task['id']}"
    deadline = time.monotonic() + 30
    while True:
        response = tour.call(client, "GET", path, show=("X-Cache",))
        if response.json()["status"] in FINISHED:
            break
        if time.monotonic() > deadline:
            raise DemoError("the sleep never finished")
        time.sleep(max(pace.poll, pace.cached_sleep / 3))
    tour.say("It has finished; the answer was stored. Ask again:")
    hit = tour.call(client, "GET", path, show=("X-Cache", "ETag"))
    if hit.headers.get("X-Cache") != "HIT":
        raise DemoError(f"expected X-Cache: HIT, got {hit.headers.get('X-Cache')}")
    tour.key("X-Cache: HIT on the second read of a finished task")
    tour.say(
        "A poller that sends the ETag back in If-None-Match learns that nothing "
        "changed without getting the body again:"
    )
    not_modified = tour.call(
        client,
        "GET",
        path,
        headers={"If-None-Match": hit.headers["ETag"]},
        show=("X-Cache", "ETag"),
    )
    if not_modified.status_code != 304:
        raise DemoError(f"expected 304, got {not_modified.status_code}")
    tour.key(f"304 Not Modified, {len(not_modified.content)} bytes of body")
    tour.notice(
        "only finished tasks are cached, and never wrongly: a requeue or delete "
        "from the dashboard changes the job's status in Redis, which drops the "
        "entry."
    )
    tour.wait_for_enter()


def dashboard(tour: Tour, client: httpx.Client, url: str, password: str) -> None:
    tour.step(
        "The dashboard and the metrics",
        "rq-dashboard is mounted at /dashboard, behind HTTP Basic auth:",
    )
    tour.console.print(
        Panel(
            f"URL       [bold]{url}/dashboard/[/bold]\n"
            f"user      [bold]admin[/bold]\n"
            f"password  [bold]{password}[/bold]",
            title="rq-dashboard",
            expand=False,
            border_style="green",
        )
    )
    tour.call(client, "GET", "/dashboard/", show=("WWW-Authenticate",))
    with httpx.Client(base_url=url, timeout=10, auth=("admin", password)) as admin:
        response = admin.get("/dashboard/")
    tour.say(
        f"  [blue]→ GET /dashboard/  (user admin and the password)[/blue]\n"
        f"  ← [bold]{response.status_code} {response.reason_phrase}[/bold] · "
        f"{len(response.content):,} bytes of HTML"
    )
    tour.say("And GET /metrics, for Prometheus (a few of its lines):")
    metrics = client.get("/metrics").text.splitlines()
    wanted = (
        "taskman_tasks_total{",
        "taskman_task_outcomes_total{",
        "taskman_rate_limited_requests_total{",
        "taskman_cache_hits_total ",
        "taskman_cache_misses_total ",
        "taskman_queue_depth ",
    )
    for line in metrics:
        if line.startswith(wanted) and not line.endswith(" 0.0"):
            tour.say(f"  [dim]{escape(line)}[/dim]")
    if tour.pause:
        tour.say(
            "[bold]Open the dashboard in a browser now: it stays up until you "
            "press Enter.[/bold]"
        )
    tour.wait_for_enter()
