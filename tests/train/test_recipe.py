"""The trainer is a plain function: it runs without Celery or Redis, and stops when asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.core.errors import UserFacingError
from app.core.jobs import JobCreate, JobSpec, ValidationSpec
from app.core.settings import Settings
from worker.train.recipe import train


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.steps: list[int] = []
        self.evals: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.phases: list[dict[str, Any]] = []
        self.etas: list[float | None] = []
        self.stop_after = stop_after

    def progress(self, step: int, total_steps: int, eta_seconds: float | None, metrics: dict[str, float],
                 point: dict[str, Any]) -> None:
        self.steps.append(step)
        self.etas.append(eta_seconds)

    def evaluated(self, point: dict[str, Any]) -> None:
        self.evals.append(point)

    def event(self, kind: str, data: dict[str, Any], record: dict[str, Any] | None = None) -> None:
        self.events.append(kind)

    def phase(self, progress: dict[str, Any]) -> None:
        self.phases.append(dict(progress))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after


def _payload(rows: list[dict[str, Any]], template: str | None = None, **hp: Any) -> JobSpec:
    """The spec the API would store for these rows (app/api/services/jobs.py builds it the same way)."""
    body = JobCreate.model_validate({"base_model": "tiny-gemma", "dataset": {"rows": rows}, "hyperparameters": {
        "max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 64,
        "gradient_checkpointing": False, "seed": 1} | hp} | ({"template": template} if template else {}))
    return JobSpec.from_request(body, "tiny-gemma", default_seed=0)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, device="cpu")


def test_trains_reports_every_step_and_saves(settings: Settings, tmp_path: Path,
                                             quotes: list[dict[str, Any]]) -> None:
    rec = Recorder()
    out = tmp_path / "adapter"
    outcome = train(_payload(quotes[:8]), out, rec, settings)
    assert not outcome.cancelled and outcome.steps == 3 and rec.steps == [1, 2, 3]
    assert (out / "adapter_model.safetensors").is_file()
    assert set(outcome.seconds) == {"data", "load", "eval", "train", "save"}
    assert rec.events == ["dataset_stats", "adapter_saved"] and outcome.evaluation["samples"]


def test_every_phase_is_reported_in_order_with_an_eta_only_once_steps_are_measured(
        settings: Settings, tmp_path: Path, quotes: list[dict[str, Any]]) -> None:
    rec = Recorder()
    spec = _payload(quotes[:24], max_steps=4, eval_interval=3)
    spec = spec.model_copy(update={"validation": ValidationSpec(fraction=0.25)})
    train(spec, tmp_path / "adapter", rec, settings)
    order = [p["phase"] for p in rec.phases]
    # the Trainer evaluates at its last step itself (eval_strategy "steps"), so there is no evaluating_after
    assert list(dict.fromkeys(order)) == ["preparing_data", "loading_model", "evaluating_before", "sampling_before",
                                          "training", "sampling_after", "saving"]
    before = [p for p in rec.phases if p["phase"] == "evaluating_before"]
    assert before[0]["phase_progress"] == {"done": 0, "total": 1}  # 6 held-out rows: one batch
    assert before[-1]["phase_progress"] == {"done": 1, "total": 1}
    # no step rate before training: no ETA; after it (evaluating_after, sampling_after) always one
    first_training = order.index("training")
    assert all(p["eta_seconds"] is None for p in rec.phases[:first_training + 1])
    assert all(p["eta_seconds"] is not None and p["eta_seconds"] >= 0 for p in rec.phases[first_training + 1:])
    assert rec.etas[0] is not None and rec.etas[-1] is not None and rec.etas[-1] <= rec.etas[0]


def test_stops_when_cancelled_and_saves_nothing(settings: Settings, tmp_path: Path,
                                                quotes: list[dict[str, Any]]) -> None:
    rec = Recorder(stop_after=2)
    out = tmp_path / "adapter"
    outcome = train(_payload(quotes[:8], max_steps=500), out, rec, settings)
    # step 2 is reported at the end of step 3 (the fast path logs each step once the next one is queued:
    # worker/train/deferred_log.py); the cancel is seen at the end of the step in progress (4), the last one
    assert outcome.cancelled and outcome.steps == 4 and rec.steps == [1, 2, 3, 4]
    assert not out.exists()


def test_template_field_missing_is_a_user_error(settings: Settings, tmp_path: Path) -> None:
    payload = _payload([{"quote": "q", "author": "a"}], template="Quote: {quote} ({year})")
    with pytest.raises(UserFacingError) as e:
        train(payload, tmp_path / "x", Recorder(), settings)
    assert e.value.code == "template_field_missing" and "'year'" in e.value.message


def test_preempted_then_resumed_adapter_equals_the_uninterrupted_one(tmp_path: Path,
                                                                    quotes: list[dict[str, Any]]) -> None:
    """Preempted (checkpoint at step 5), resumed in a new trainer to step 12 (past an epoch of 8 steps): the
    adapter is bitwise the uninterrupted run's. Two things broke this on the CPU before: bitsandbytes' weight
    repacking at the first no-grad forward (the adapter is loaded after it on resume) and peft's fp32 upcast
    of the reloaded LoRA weights (trl trains them in bf16 over an NF4 base)."""
    from safetensors.torch import load_file

    settings = Settings(data_dir=tmp_path, device="cpu", checkpoint_interval=4)
    payload = _payload(quotes[:16], max_steps=12, seed=7)
    train(payload, tmp_path / "whole", Recorder(), settings)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    first = Recorder()
    stopped = train(payload, tmp_path / "resumed", first, settings, checkpoint_dir=ckpt,
                    preempt=lambda: len(first.steps) >= 4)
    # asked once step 4 is reported (the Trainer logs a step after its step-end hooks): stops after step 5
    assert stopped.preempted and stopped.steps == 5 and not (tmp_path / "resumed").exists()
    second = Recorder()
    done = train(payload, tmp_path / "resumed", second, settings, checkpoint_dir=ckpt)
    assert done.steps == 12 and second.steps == list(range(6, 13)) and "resumed" in second.events
    whole, resumed = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "resumed"))
    assert whole.keys() == resumed.keys()
    assert all(bool((whole[k] == resumed[k]).all()) for k in whole)


@pytest.mark.parametrize("fast", [True, False])
def test_a_loss_that_becomes_nan_fails_the_job_as_diverged(settings: Settings, tmp_path: Path,
                                                           quotes: list[dict[str, Any]],
                                                           monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    """LoRA weights poisoned with NaN after step 1 (what a far too high learning rate ends in): the job fails with
    ``diverged`` and saves no adapter. (transformers' default ``logging_nan_inf_filter`` logged such steps as
    loss 0.0, so a diverged job used to succeed.)"""
    import torch
    from transformers import TrainerCallback

    import worker.train.recipe as trainer_module

    class Poison(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.global_step == 1:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if "lora_B" in name:
                            p.fill_(float("nan"))

    build = trainer_module.build_trainer

    def build_and_poison(*args: Any, **kwargs: Any) -> Any:
        trainer, *rest = build(*args, **kwargs)
        trainer.add_callback(Poison())
        return (trainer, *rest)

    monkeypatch.setattr(trainer_module, "build_trainer", build_and_poison)
    settings.train_fast_path = fast
    rec = Recorder()
    with pytest.raises(UserFacingError) as e:
        train(_payload(quotes[:8]), tmp_path / "adapter", rec, settings)
    assert e.value.code == "diverged" and rec.steps == [1, 2, 3]
    assert not (tmp_path / "adapter").exists()


def test_each_step_is_logged_after_the_next_is_queued_and_before_evals_and_the_end(
        settings: Settings, tmp_path: Path, quotes: list[dict[str, Any]]) -> None:
    """worker/train/deferred_log.py: step N's loss is read back and logged once step N+1 has run (so the GPU always has
    a step queued), as of step N (its step number, epoch and values); at once where an evaluation, a checkpoint
    or the end is due, so those see every step's log; not at an epoch's end. The run's mean loss counts every
    step once."""
    from transformers import TrainerCallback

    from worker.train.recipe import build_trainer

    body = JobCreate.model_validate({"base_model": "tiny-gemma", "dataset": {"rows": quotes[:20]},
                                     "validation": {"fraction": 0.2}, "hyperparameters": {
                                         "max_steps": 6, "eval_interval": 3, "batch_size": 4,
                                         "gradient_accumulation_steps": 1, "max_length": 64,
                                         "gradient_checkpointing": False, "seed": 1}})
    seen: list[tuple[str, int]] = []

    class Order(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seen.append(("end", state.global_step))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            kind = "loss" if "loss" in logs else "eval" if "eval_loss" in logs else "summary"
            seen.append((kind, state.global_step))

    trainer, *_ = build_trainer(JobSpec.from_request(body, "tiny-gemma", default_seed=0), Recorder(), settings,
                                str(tmp_path / "run"))
    trainer.add_callback(Order())
    out = trainer.train()
    assert seen == [("end", 1), ("end", 2), ("loss", 1), ("end", 3), ("loss", 2), ("loss", 3), ("eval", 3),
                    ("end", 4), ("end", 5), ("loss", 4), ("end", 6), ("loss", 5), ("loss", 6), ("eval", 6),
                    ("summary", 6)]
    logs = [p for p in trainer.state.log_history if "loss" in p]
    assert [p["step"] for p in logs] == [1, 2, 3, 4, 5, 6]
    assert [p["epoch"] for p in logs] == pytest.approx([s * 4 / 16 for s in range(1, 7)])  # an epoch ends at 4
    assert all(p["grad_norm"] > 0 and p["num_tokens"] > 0 for p in logs)
    assert [p["num_tokens"] for p in logs] == sorted({p["num_tokens"] for p in logs})  # each step's own count
    assert out.training_loss == pytest.approx(sum(p["loss"] for p in logs) / 6, rel=1e-6)
