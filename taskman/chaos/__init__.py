"""``taskman chaos`` (being split into modules)."""

from taskman.chaos.run import RECOVERY_TARGET, ChaosResult, print_summary, run_chaos

__all__ = ["RECOVERY_TARGET", "ChaosResult", "print_summary", "run_chaos"]
