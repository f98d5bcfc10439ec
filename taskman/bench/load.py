"""Load on one URL: requests/s and latency percentiles, from wrk where installed,
else from httpx; and, given the server's pid, the CPU it spent per request.

CPU per request is read from /proc (user + system time over the run, divided by
the requests served): on a shared 2-core machine req/s moves by +-20 % between
runs, as other processes take the cores; the CPU a request costs moves far less.
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import httpx

from taskman.processes import cpu_seconds


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    tool: str
    requests: int = 0  # answered during the run
    # CPU (user + system) of the server process per request, µs; None: not asked.
    cpu_us: float | None = None


def load(
    url: str,
    seconds: float,
    connections: int = 32,
    body: dict[str, Any] | None = None,
    pid: int | None = None,
) -> Load:
    """Requests/s and latency percentiles under load, from wrk where installed;
    with ``pid`` (the server's), its CPU per request."""
    cpu_before = cpu_seconds(pid) if pid is not None else 0.0
    if shutil.which("wrk"):
        result = _wrk(url, seconds, connections, body)
    else:
        result = _python_load(url, seconds, connections, body)
    if pid is not None and result.requests:
        spent = cpu_seconds(pid) - cpu_before
        result.cpu_us = round(spent / result.requests * 1e6, 1)
    return result


def _wrk(
    url: str, seconds: float, connections: int, body: dict[str, Any] | None
) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if body is not None:
            script.write(
                'wrk.method = "POST"\n'
                f"wrk.body = [[{json.dumps(body)}]]\n"
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out:
        raise RuntimeError(f"errors under load:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    return Load(rps, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"), "wrk", requests)


def _wrk_ms(out: str, percentile: str) -> float:
    value, unit = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _python_load(
    url: str, seconds: float, connections: int, body: dict[str, Any] | None
) -> Load:
    latencies: list[float] = []

    async def one_connection(client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            if body is None:
                response = await client.get(url)
            else:
                response = await client.post(url, json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async def main() -> float:
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            started = time.monotonic()
            deadline = started + seconds
            await asyncio.gather(
                *(one_connection(client, deadline) for _ in range(connections))
            )
            return time.monotonic() - started

    elapsed = asyncio.run(main())
    p50, p99 = percentiles(latencies)
    return Load(
        len(latencies) / elapsed, p50, p99, "httpx (wrk not installed)", len(latencies)
    )


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    if not ordered:
        return 0.0, 0.0

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return pick(0.5), pick(0.99)
