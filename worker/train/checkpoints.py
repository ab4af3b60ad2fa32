"""Training checkpoints: saved every ``checkpoint_interval`` steps and when the worker is stopped (SIGTERM);
a requeued job resumes from its latest complete one.

A checkpoint is the HF Trainer's own (``checkpoint-<step>``: adapter, optimizer, scheduler, RNG states,
trainer state) and resuming is the Trainer's (``train(resume_from_checkpoint=...)``), which restores
all of it and skips the batches already trained on, so a resumed job ends at exactly ``max_steps`` with
the adapter an uninterrupted run gives. Checkpoints live in ``<data_dir>/checkpoints/<job id>/``; only
the newest is kept, and the task deletes the folder when the job ends.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

#: Written after the Trainer has saved everything: a checkpoint without it was cut short (SIGKILL).
COMPLETE = "ftaas-complete"


class CheckpointCallback(TrainerCallback):
    """Asks the Trainer to save every ``every`` steps, and to save and stop once ``preempt()`` holds.

    ``stopped()`` is true once the job was cancelled or its lease lost: nothing is saved then.
    Runs after the progress callback, so it sees that step's cancellation.
    """

    def __init__(self, every: int, preempt: Callable[[], bool] | None, stopped: Callable[[], bool]) -> None:
        self.every, self.preempt, self.stopped = every, preempt, stopped
        self.preempted = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.stopped():
            return
        if self.preempt is not None and self.preempt():
            self.preempted = True
            control.should_training_stop = True
            control.should_save = True
        elif self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            control.should_save = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        root = Path(args.output_dir or ".")
        saved = root / f"checkpoint-{state.global_step}"
        tmp = saved / (COMPLETE + ".tmp")
        tmp.write_text(str(state.global_step))
        tmp.rename(saved / COMPLETE)
        for older in root.glob("checkpoint-*"):
            if older != saved:
                shutil.rmtree(older, ignore_errors=True)


class KeepAdapterDtypeOnResume:
    """Trainer mixin. trl keeps a quantized base's LoRA weights in bf16 (QLoRA's recipe); the Trainer's resume
    loads them back through peft's ``load_adapter``, which upcasts them to fp32, so a resumed job trained on in
    another precision than an uninterrupted one (tiny-gemma, 12 steps resumed at 4: adapters 0.5 % apart in norm;
    with this mixin bitwise equal: tests/train/test_recipe.py)."""

    model: Any

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])


def latest(directory: Path | None) -> Path | None:
    """The newest complete checkpoint in ``directory``, if any."""
    if directory is None or not directory.is_dir():
        return None
    done = [p for p in directory.glob("checkpoint-*") if (p / COMPLETE).is_file() and p.name[11:].isdigit()]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))
