"""The phase clock (worker/train/phases.py): the ETA of the whole rest of a job from measured rates."""

from __future__ import annotations

import pytest

from worker.train.phases import PhaseClock, evals_after


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("step", "total", "every", "expected"), [
    (0, 20, 4, 5),   # 4, 8, 12, 16, 20: the one at 20 is also the final one
    (4, 20, 4, 4),
    (0, 10, 4, 3),   # 4, 8, then the recipe's own at 10
    (10, 10, 4, 1),  # only the final one is left
    (3, 10, None, 0),
])
def test_evals_left(step: int, total: int, every: int | None, expected: int) -> None:
    assert evals_after(step, total, every) == expected


def test_no_eta_until_a_training_step_is_measured_then_all_phases_left_are_counted() -> None:
    now = FakeTime()
    clock = PhaseClock(total_steps=10, eval_steps=5, now=now)
    assert clock.progress()["phase"] == "preparing_data" and clock.eta_seconds() is None
    now.t += 3
    clock.enter("loading_model")
    now.t += 2
    assert clock.enter("evaluating_before", 4)["phase_progress"] == {"done": 0, "total": 4}
    now.t += 2
    clock.evaluated(2.0)  # an evaluation takes 2 s
    assert clock.advance(4)["phase_progress"] == {"done": 4, "total": 4} and clock.eta_seconds() is None
    clock.enter("sampling_before")
    now.t += 6  # sampling takes 6 s
    training = clock.enter("training", 10)
    assert training["eta_seconds"] is None, "no step has been measured yet"
    now.t += 1.5
    clock.stepped(1)
    now.t += 1.5
    clock.stepped(2)
    # 8 steps of 1.5 s, evaluations at 5 and 10 (10 is the last step: no separate final one), sampling 6 s
    assert clock.eta_seconds() == pytest.approx(8 * 1.5 + 2 * 2.0 + 6.0)
    for step in range(3, 6):
        now.t += 1.5
        clock.stepped(step)
    now.t += 2.0
    clock.evaluated(2.0)  # the evaluation at step 5 does not count as step time
    assert clock.step_seconds() == pytest.approx(1.5)
    assert clock.eta_seconds() == pytest.approx(5 * 1.5 + 1 * 2.0 + 6.0)
    assert clock.progress()["fraction"] == 0.5
    clock.enter("sampling_after")
    now.t += 4
    assert clock.eta_seconds() == pytest.approx(2.0)
    now.t += 4
    assert clock.eta_seconds() == 0.0, "never negative when a phase runs longer than measured"
    assert clock.enter("saving")["eta_seconds"] == 0.0


def test_a_resumed_run_measures_its_own_steps_only() -> None:
    now = FakeTime()
    clock = PhaseClock(total_steps=10, eval_steps=None, now=now)
    clock.stepped(6)  # resumed at a checkpoint of step 6
    clock.enter("training", 10)
    assert clock.eta_seconds() is None
    now.t += 2
    clock.stepped(7)
    assert clock.step_seconds() == pytest.approx(2.0)
    assert clock.eta_seconds() == pytest.approx(3 * 2.0)
