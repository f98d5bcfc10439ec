"""Chaos, CI-sized: phase 3 as real processes (uvicorn, Redis, workers) while
workers are SIGKILLed and Redis is SIGKILLed and restarted. `taskman chaos` runs
the full size (10,000 tasks, 20 kills)."""

import pytest

from taskman.chaos import run_chaos


@pytest.mark.timeout(150)
def test_no_accepted_task_is_lost_or_stuck_when_workers_and_redis_are_killed() -> None:
    result = run_chaos(500, 3, workers=3, seed=500, settle_timeout=45)
    assert (result.worker_kills, result.redis_kills) == (3, 1)
    assert result.accepted == 500, f"{result.refused} submissions refused"
    assert result.lost == [], result.run_dir
    assert result.stuck == {}, result.stuck_detail
    assert result.wrong == {}
    assert result.flaky[0] == result.flaky[1] > 0
    assert result.fail[0] == result.fail[1] > 0
    # At least once: a kill may cost the attempt it interrupts, so a task may run
    # again, but only one that was in flight at a kill. A fail task still makes
    # exactly max_retries + 1 attempts (the interrupted one counts as one).
    assert result.unexplained == []
    assert set(result.fail_off) <= set(result.explained), result.fail_off
    assert result.recovery_seconds is not None
    assert result.recovery_seconds <= 30
