"""``taskman bench``: every phase as real processes, measured in one run against
baselines run in that same run, so each figure is a ratio that holds on any machine.
"""

from taskman.bench.runner import FIGURES, run
from taskman.bench.table import table

__all__ = ["FIGURES", "run", "table"]
