"""What a training job is doing (its phase) and how long all that is left will take.

A job runs these phases in order (``queued`` is the store's, before a worker has it). The ETA covers every
phase still ahead, from what this run has measured: the mean training step (evaluation time taken out), the
mean evaluation, the sampling before training (the sampling after costs the same: same prompts, same
lengths). Before the first training step there is no step rate, so there is no ETA (``None``: shown as
"estimating"), never a guess.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.core.jobs import PHASES, JobPhase

__all__ = ["PHASES", "PhaseClock", "evals_after"]


def evals_after(step: int, total_steps: int, eval_steps: int | None) -> int:
    """Evaluations still to run after ``step``: one at every multiple of ``eval_steps`` up to the end, and
    one at the last step when it is not such a multiple (the Trainer's own at its end; None: no validation)."""
    if not eval_steps:
        return 0
    periodic = total_steps // eval_steps - step // eval_steps
    return periodic + (0 if total_steps % eval_steps == 0 else 1)


class PhaseClock:
    """The job's phase, the progress inside it, and the ETA of the whole rest of the job.

    ``progress()`` is the record's ``progress`` object: step, total_steps, fraction, eta_seconds, phase and
    phase_progress ({done, total} or None).
    """

    def __init__(self, total_steps: int, eval_steps: int | None,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.total_steps, self.eval_steps, self.now = total_steps, eval_steps, now
        self.phase: JobPhase = "preparing_data"
        self.done = 0
        self.total: int | None = None
        self.step = 0
        self.phase_start = now()
        self._eval_s: list[float] = []  # each evaluation's seconds (before, periodic, after)
        self._sampling_s: float | None = None  # the sampling before training
        self._train_start: float | None = None
        self._train_step0 = 0
        self._eval_in_train = 0.0  # evaluation seconds inside the training phase

    # -- what the recipe tells it ---------------------------------------------------------------
    def enter(self, phase: JobPhase, total: int | None = None) -> dict[str, Any]:
        """Start ``phase`` (one of PHASES) with ``total`` units of progress, if it has any."""
        now = self.now()
        if self.phase == "sampling_before":
            self._sampling_s = now - self.phase_start
        self.phase, self.done, self.total, self.phase_start = phase, 0, total, now
        if phase == "training":
            self._train_start, self._train_step0, self.done = now, self.step, self.step
        return self.progress()

    def advance(self, done: int) -> dict[str, Any]:
        """``done`` units of the current phase are finished."""
        self.done = done
        return self.progress()

    def evaluated(self, seconds: float) -> None:
        """An evaluation (of any phase) took ``seconds``."""
        self._eval_s.append(seconds)
        if self.phase == "training":
            self._eval_in_train += seconds

    def stepped(self, step: int) -> None:
        """Training reached global step ``step``."""
        self.step = step
        if self.phase == "training":
            self.done = step

    # -- what it reports --------------------------------------------------------------------------
    def step_seconds(self) -> float | None:
        """The mean seconds of a training step so far in this run, evaluations excluded."""
        if self._train_start is None or self.step <= self._train_step0:
            return None
        spent = self.now() - self._train_start - self._eval_in_train
        return max(spent, 0.0) / (self.step - self._train_step0)

    def eta_seconds(self) -> float | None:
        """Seconds until the job ends, or None while there is no measured rate to base it on."""
        eval_s = sum(self._eval_s) / len(self._eval_s) if self._eval_s else 0.0
        sampling = self._sampling_s or 0.0
        in_phase = self.now() - self.phase_start
        if self.phase == "training":
            rate = self.step_seconds()
            if rate is None:
                return None
            evals = evals_after(self.step, self.total_steps, self.eval_steps)
            left = (self.total_steps - self.step) * rate + evals * eval_s + sampling
        elif self.phase == "evaluating_after":
            left = max(eval_s - in_phase, 0.0) + sampling
        elif self.phase == "sampling_after":
            left = max(sampling - in_phase, 0.0)
        elif self.phase == "saving":
            left = 0.0
        else:
            return None
        return round(left, 1)

    def progress(self) -> dict[str, Any]:
        total = self.total_steps
        return {"step": self.step, "total_steps": total, "fraction": round(min(self.step / total, 1.0), 4),
                "eta_seconds": self.eta_seconds(), "phase": self.phase,
                "phase_progress": {"done": self.done, "total": self.total} if self.total else None}
