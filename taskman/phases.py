"""The phases, by number: what ``taskman serve --phase N`` and the tools run."""

PHASES = {1: "phase1_inprocess", 2: "phase2_queue", 3: "phase3_production"}
LATEST = max(PHASES)


def queued(phase: int) -> bool:
    """From phase 2 on, tasks wait in Redis for worker processes of their own."""
    return phase >= 2
