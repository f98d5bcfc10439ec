"""The bench's results as Markdown tables, the way the docs quote them."""

from typing import Any


def table(results: dict[str, Any]) -> str:
    def ratio(value: float, base: float) -> str:
        return f"{value / base:.0%}" if base else "-"

    lines = [f"Run {results['date']} on {results['machine']}."]
    measured = [
        k for k in ("phase1", "phase2", "phase3") if "post" in results.get(k, {})
    ]
    if "baseline_post" in results:
        bp, bg = results["baseline_post"], results["baseline_get"]
        lines += [
            f"HTTP load: {bp['tool']}, {results['seconds']} s per figure.",
            "",
            "API alone (no worker runs during the POST and GET loads), uvicorn's "
            "access log off; CPU: the API process's, from /proc.",
            "",
            "| | POST /tasks req/s | CPU µs/req | vs bare | p50 / p99 ms | GET /tasks/{id} req/s | CPU µs/req | vs bare | echo submit→done p50 / p99 ms |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| bare FastAPI | {bp['rps']:.0f} | {_cpu(bp)} | 100% | {bp['p50_ms']} / {bp['p99_ms']} | {bg['rps']:.0f} | {_cpu(bg)} | 100% | - |",
        ]
        for key in measured:
            r = results[key]
            lines.append(
                f"| {key} | {r['post']['rps']:.0f} | {_cpu(r['post'])} | {ratio(r['post']['rps'], bp['rps'])} | "
                f"{r['post']['p50_ms']} / {r['post']['p99_ms']} | {r['get']['rps']:.0f} | {_cpu(r['get'])} | "
                f"{ratio(r['get']['rps'], bg['rps'])} | {r['echo_p50_ms']} / {r['echo_p99_ms']} |"
            )
    pending = [k for k in measured if "get_unfinished" in results[k]]
    if pending:
        bg = results["baseline_get"]
        lines += _table(
            "| | GET /tasks/{id} of an unfinished task req/s | CPU µs/req | vs bare GET |",
            [
                f"| {key} | {u['rps']:.0f} | {_cpu(u)} | {ratio(u['rps'], bg['rps'])} |"
                for key in pending
                for u in [results[key]["get_unfinished"]]
            ],
        )
    waited = [
        k for k in ("phase1", "phase2", "phase3") if "batch" in results.get(k, {})
    ]
    if waited:
        lines += _table(
            "| | `?wait=` answered after the task's end, p50 / p99 ms | `POST /tasks/batch` of 100, tasks/s (API alone) | batch p50 / p99 ms |",
            [
                f"| {key} | {r['wait_p50_ms']} / {r['wait_p99_ms']} | "
                f"{r['batch']['tasks_per_s']} | {r['batch']['p50_ms']} / {r['batch']['p99_ms']} |"
                for key in waited
                for r in [results[key]]
            ],
        )
    durable = [
        k for k in ("phase1", "phase2", "phase3") if "durability" in results.get(k, {})
    ]
    if durable:
        lines += _table(
            "| kill -9 mid-run, then restart | tasks accepted | lost |",
            [
                f"| {key} | {d['submitted']} | {d['lost']} |"
                for key in durable
                for d in [results[key]["durability"]]
            ],
        )
    if "phase2" in measured and "phase3" in measured:
        p2, p3 = results["phase2"], results["phase3"]
        lines += [
            "",
            f"Phase 3 vs phase 2: POST {ratio(p3['post']['rps'], p2['post']['rps'])}, "
            f"GET {ratio(p3['get']['rps'], p2['get']['rps'])} (phase 3 GET is served by its cache).",
        ]
    if "workers" in results:
        w = results["workers"]
        lines += [
            "",
            "| worker on echo, jobs/s | 1 process | 2 processes |",
            "|---|---|---|",
            f"| stock `rq worker` (SimpleWorker) | {w['stock_1']} | {w['stock_2']} |",
        ]
        for kind in sorted(k[: -len("_1")] for k in w if k.endswith("_1")):
            if kind != "stock":
                lines.append(
                    f"| taskman worker --phase {kind[len('phase') :]} | {w[kind + '_1']} "
                    f"({ratio(w[kind + '_1'], w['stock_1'])}) | {w[kind + '_2']} "
                    f"({ratio(w[kind + '_2'], w['stock_2'])}) |"
                )
    if "loop" in results:
        lines += [
            "",
            "| phase 1 /health while hashing | p50 ms | p99 ms |",
            "|---|---|---|",
        ]
        for label, (p50, p99) in results["loop"].items():
            lines.append(f"| {label} | {p50} | {p99} |")
    if "peers" in results:
        lines += ["", *peers_table(results["peers"])]
    return "\n".join(lines)


def _cpu(load: dict[str, Any]) -> str:
    """A load's CPU per request of the server, µs ("-": not measured)."""
    cpu = load.get("cpu_us")
    return "-" if cpu is None else f"{cpu:.0f}"


def peers_table(peers: dict[str, Any]) -> list[str]:
    """The same echo workload through each peer, and phase 3 as `taskman serve`."""
    bare = peers["bare"]
    lines = [
        "| the same echo workload | POST req/s, API alone | vs bare | API CPU µs/req "
        "| accepted/s, with 1 worker | finished/s, end to end | worker alone, "
        "jobs/s (steady) | Redis round trips / commands per job |",
        "|---|---|---|---|---|---|---|---|",
        f"| bare FastAPI (no queue) | {bare['rps']:.0f} | 100% | {_cpu(bare)} "
        "| - | - | - | - |",
    ]
    for figures in peers["measured"].values():
        alone, load, drain = (
            figures["api_alone"],
            figures["with_worker"],
            figures["worker_alone"],
        )
        vs = f"{alone['rps'] / bare['rps']:.0%}" if bare["rps"] else "-"
        lines.append(
            f"| {figures['label']} | {alone['rps']:.0f} | {vs} | {_cpu(alone)} "
            f"| {load['accepted_per_s']:.0f} | {load['finished_per_s']:.0f} "
            f"| {drain['jobs_per_s']:.0f} "
            f"| {drain['round_trips_per_job']} / {drain['commands_per_job']} |"
        )
    full = peers["full_stack"]
    lines += [
        f"| full stack: `taskman serve --phase 3 --workers 1` (its own logging, "
        f"access log on) | - | - | {_cpu(full)} | {full['accepted_per_s']:.0f} "
        f"| {full['finished_per_s']:.0f} | - | - |",
        "",
        "API alone: workers off, uvicorn 1 process, access log off (the bare app's "
        "settings); CPU is the API process's, from /proc. With 1 worker: the same "
        "POST load, its worker (1 process) running; finished/s from the library's own "
        "count (RQ's finished registry, the results it keeps). Worker alone: a pre-filled queue, "
        "the rate from 90 % to 10 % of it left; round trips are the Redis "
        "server's reply writes (INFO total_writes_processed), commands its "
        "total_commands_processed, both per job, the bench's own polling taken "
        "out.",
    ]
    lines += [f"- {reason}" for reason in peers["skipped"].values()]
    return lines


def _table(header: str, rows: list[str]) -> list[str]:
    """A Markdown table after a blank line: the header, its rule, the rows."""
    return ["", header, "|" + "---|" * (header.count("|") - 1), *rows]
