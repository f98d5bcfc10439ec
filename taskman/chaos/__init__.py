"""``taskman chaos``: phase 3 as real processes, under fire.

N tasks go in over HTTP while worker processes are SIGKILLed (a replacement starts
each time) and Redis is SIGKILLed and restarted once. Every 202 the client got goes
in a ledger; at the end every accepted task must be final and right: none lost
(404), none stuck, every ``flaky`` succeeded, every ``fail`` failed.
"""

from taskman.chaos.result import RECOVERY_TARGET, ChaosResult, print_summary
from taskman.chaos.run import run_chaos

__all__ = ["RECOVERY_TARGET", "ChaosResult", "print_summary", "run_chaos"]
