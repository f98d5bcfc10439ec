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
            "| | POST /tasks req/s | vs bare | p50 / p99 ms | GET /tasks/{id} req/s | vs bare | echo submit→done p50 / p99 ms |",
            "|---|---|---|---|---|---|---|",
            f"| bare FastAPI | {bp['rps']:.0f} | 100% | {bp['p50_ms']} / {bp['p99_ms']} | {bg['rps']:.0f} | 100% | - |",
        ]
        for key in measured:
            r = results[key]
            lines.append(
                f"| {key} | {r['post']['rps']:.0f} | {ratio(r['post']['rps'], bp['rps'])} | "
                f"{r['post']['p50_ms']} / {r['post']['p99_ms']} | {r['get']['rps']:.0f} | "
                f"{ratio(r['get']['rps'], bg['rps'])} | {r['echo_p50_ms']} / {r['echo_p99_ms']} |"
            )
    durable = [
        k for k in ("phase1", "phase2", "phase3") if "durability" in results.get(k, {})
    ]
    if durable:
        lines += [
            "",
            "| kill -9 mid-run, then restart | tasks accepted | lost |",
            "|---|---|---|",
        ]
        for key in durable:
            d = results[key]["durability"]
            lines.append(f"| {key} | {d['submitted']} | {d['lost']} |")
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
    return "\n".join(lines)
