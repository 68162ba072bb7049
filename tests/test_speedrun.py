"""The speedrun's size: the default recipe where the machine runs it within the budget, proportionally less
where it cannot (the end-to-end run itself is tests/test_cli.py's)."""

import pytest

from sobre import speedrun as sr


@pytest.mark.parametrize("step_s", [0.5, 0.74, 1.25, 3.0])
def test_fit_steps_sizes_the_run_to_the_budget(monkeypatch, step_s):
    monkeypatch.setattr(sr, "pretrain_step_seconds", lambda preset_name: step_s)
    steps = sr.fit_steps("tiny", minutes=30)
    at_default = (sr.PRETRAIN_COST + sr.rest_cost(step_s)) * step_s / 60
    if at_default <= 27:
        assert steps == sr.STEPS
    else:  # proportionally fewer steps: the estimate at that size is within 90% of the budget
        assert 30 <= steps < sr.STEPS
        assert at_default * steps / sr.STEPS <= 27 + 1e-9
    assert sr.fit_steps("tiny", minutes=600) == sr.STEPS
    if step_s <= 0.74:  # the machine behind runs/speedrun16 (0.74 s a step) runs the default recipe
        assert steps == sr.STEPS


def test_fit_later_uses_the_pace_and_time_pretraining_took():
    fast = {"tokens_per_s": 2800, "minutes": 4.0}  # a machine that runs the default recipe in ~25 minutes
    assert sr.fit_later(fast, minutes=30) == sr.STEPS
    slow = {"tokens_per_s": 1697, "minutes": 4.06}  # runs/speedrun17: 1.21 s/step
    later = sr.fit_later(slow, minutes=30)
    assert 30 <= later < sr.STEPS
    step_s = 8 * 256 / slow["tokens_per_s"]
    minutes = slow["minutes"] + sr.rest_cost(step_s) * step_s / 60 * later / sr.STEPS
    assert minutes <= 30 + 1e-9
    assert sr.fit_later(dict(slow, minutes=6.0), minutes=30) < later  # a longer pretraining leaves less time
    assert sr.fit_later(dict(slow, minutes=40.0), minutes=30) == 30  # never below the floor
