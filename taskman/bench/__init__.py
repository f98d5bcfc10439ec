"""``taskman bench`` (being split into modules)."""

from taskman.bench.figures import FIGURES, run, table

__all__ = ["FIGURES", "run", "table"]
