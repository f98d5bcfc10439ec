"""``taskman``: serve a phase, run a worker, or talk to a running API.

A thin layer, like arq's cli.py: it builds Settings and hands over to uvicorn or RQ.
It sits above the phases; nothing imports it.
"""

import json
import logging
import time
from typing import Annotated, Any

import httpx
import typer
import uvicorn
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help=__doc__, add_completion=False)
console = Console()

PHASES = {1: "phase1_inprocess"}
LATEST = max(PHASES)

Phase = Annotated[int, typer.Option(min=1, max=3, help="Which phase to run.")]
Url = Annotated[str, typer.Option(envvar="TASKMAN_URL", help="The API to talk to.")]


def _module(phase: int) -> str:
    if phase not in PHASES:
        raise typer.BadParameter(
            f"phase {phase} is not built yet", param_hint="--phase"
        )
    return PHASES[phase]


@app.command()
def serve(
    phase: Phase = LATEST,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Serve a phase's API (OpenAPI docs at /docs)."""
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s:  [taskman] %(message)s"
    )
    uvicorn.run(
        f"{_module(phase)}:create_app",
        factory=True,
        host=host,
        port=port,
        # X-Forwarded-For is believed only from TASKMAN_TRUSTED_PROXIES (phase 3),
        # not from anyone on 127.0.0.1 as uvicorn would by default.
        proxy_headers=False,
        timeout_graceful_shutdown=30,
    )


@app.command()
def submit(
    type: Annotated[  # noqa: A002
        str, typer.Argument(help="echo, sleep, primes, hash, flaky or fail")
    ],
    payload: Annotated[str, typer.Option(help="The payload, as JSON.")] = "{}",
    max_retries: Annotated[int | None, typer.Option()] = None,
    wait: Annotated[bool, typer.Option(help="Poll until the task finishes.")] = False,
    url: Url = "http://127.0.0.1:8000",
) -> None:
    """Submit a task and print it."""
    try:
        body: dict[str, Any] = {"type": type, "payload": json.loads(payload)}
    except json.JSONDecodeError as error:
        raise typer.BadParameter(f"not JSON: {error}", param_hint="--payload") from None
    if max_retries is not None:
        body["max_retries"] = max_retries
    with httpx.Client(base_url=url, timeout=10) as client:
        task = _answer(client.post("/tasks", json=body))
        while wait and task["status"] not in ("succeeded", "failed", "canceled"):
            time.sleep(0.1)
            task = _answer(client.get(f"/tasks/{task['id']}"))
    console.print_json(data=task)


@app.command()
def status(task_id: str, url: Url = "http://127.0.0.1:8000") -> None:
    """Print a task."""
    with httpx.Client(base_url=url, timeout=10) as client:
        console.print_json(data=_answer(client.get(f"/tasks/{task_id}")))


def _answer(response: httpx.Response) -> Any:
    if response.is_error:
        console.print(f"[red]{response.status_code}[/red] {response.text}")
        raise typer.Exit(1)
    return response.json()
