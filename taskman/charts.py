"""PNG charts of a bench run, for docs/ (matplotlib, drawn without a display)."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def draw(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"{results['date'][:10]}, {results['machine']}"
    written = []
    if "baseline_post" in results:
        written.append(_throughput(results, out / "throughput.png", stamp))
    if "workers" in results:
        written.append(_workers(results["workers"], out / "workers.png", stamp))
    if "loop" in results:
        written.append(_loop(results["loop"], out / "loop.png", stamp))
    return written


def _throughput(results: dict[str, Any], path: Path, stamp: str) -> Path:
    names = ["bare FastAPI"] + [
        k for k in ("phase1", "phase2", "phase3") if k in results
    ]
    post = [results["baseline_post"]["rps"]] + [
        results[k]["post"]["rps"] for k in names[1:]
    ]
    get = [results["baseline_get"]["rps"]] + [
        results[k]["get"]["rps"] for k in names[1:]
    ]
    figure, axes = plt.subplots(figsize=(7, 3.5))
    positions = range(len(names))
    axes.bar([p - 0.2 for p in positions], post, width=0.4, label="POST /tasks")
    axes.bar(
        [p + 0.2 for p in positions], get, width=0.4, label="GET /tasks/{id} (finished)"
    )
    axes.set_xticks(list(positions), names)
    axes.set_ylabel("requests / s")
    axes.set_title(f"HTTP throughput ({stamp})", fontsize=9)
    axes.legend()
    return _save(figure, path)


def _workers(workers: dict[str, float], path: Path, stamp: str) -> Path:
    figure, axes = plt.subplots(figsize=(6, 3.5))
    kinds = sorted(k[: -len("_1")] for k in workers if k.endswith("_1"))
    width = 0.8 / len(kinds)
    for index, kind in enumerate(kinds):
        offset = (index - (len(kinds) - 1) / 2) * width
        label = "stock rq worker (SimpleWorker)" if kind == "stock" else kind
        axes.bar(
            [1 + offset, 2 + offset],
            [workers[f"{kind}_1"], workers[f"{kind}_2"]],
            width=width,
            label=label,
        )
    axes.set_xticks([1, 2], ["1 process", "2 processes"])
    axes.set_ylabel("echo jobs / s")
    axes.set_title(f"Worker throughput ({stamp})", fontsize=9)
    axes.legend()
    return _save(figure, path)


def _loop(loop: dict[str, list[float]], path: Path, stamp: str) -> Path:
    labels = list(loop)
    figure, axes = plt.subplots(figsize=(7, 3.5))
    positions = range(len(labels))
    axes.bar(
        [p - 0.2 for p in positions],
        [loop[k][0] for k in labels],
        width=0.4,
        label="p50",
    )
    axes.bar(
        [p + 0.2 for p in positions],
        [loop[k][1] for k in labels],
        width=0.4,
        label="p99",
    )
    axes.set_xticks(
        list(positions), [label.replace(" (", "\n(") for label in labels], fontsize=8
    )
    axes.set_yscale("log")
    axes.set_ylabel("GET /health, ms (log)")
    axes.set_title(f"Phase 1: is the event loop free? ({stamp})", fontsize=9)
    axes.legend()
    return _save(figure, path)


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
