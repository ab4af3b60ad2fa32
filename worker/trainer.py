"""The notebook's recipe as a plain function: NF4 base + LoRA (peft) + trl SFTTrainer.

No Celery here: ``train`` takes the accepted job request and a ``Reporter`` and can run alone.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import LoraConfig
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trl import SFTConfig, SFTTrainer

from app.settings import Settings
from worker.data import training_texts
from worker.errors import UserFacingError
from worker.models import compute_dtype, load_model, load_tokenizer, pick_device

log = logging.getLogger("ftaas.trainer")

_LOGGED = {"loss": "loss", "learning_rate": "learning_rate", "epoch": "epoch", "grad_norm": "grad_norm"}


class Reporter(Protocol):
    def progress(self, step: int, total_steps: int, eta_seconds: float | None, metrics: dict[str, float]) -> None: ...
    def should_stop(self) -> bool: ...


@dataclass
class TrainOutcome:
    cancelled: bool
    steps: int
    losses: list[float]
    seconds: dict[str, float]


class _ProgressCallback(TrainerCallback):
    """Writes progress at each logging step; stops training at the next step once cancelled."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.cancelled = False
        self.losses: list[float] = []
        self.t0 = time.monotonic()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.t0 = time.monotonic()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.reporter.should_stop():
            self.cancelled = True
            control.should_training_stop = True

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return  # the end-of-training summary, not a step
        metrics = {k: float(logs[src]) for k, src in _LOGGED.items() if isinstance(logs.get(src), int | float)}
        self.losses.append(float(logs["loss"]))
        step, total = state.global_step, state.max_steps
        elapsed = time.monotonic() - self.t0
        eta = round(elapsed / step * (total - step), 1) if step else None
        self.reporter.progress(step, total, eta, metrics)


def _config(hp: dict[str, Any], device: str, output_dir: str) -> SFTConfig:
    half = compute_dtype(device)
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=hp["batch_size"],
        gradient_accumulation_steps=hp["gradient_accumulation_steps"],
        warmup_steps=hp["warmup_steps"],
        max_steps=hp["max_steps"],
        learning_rate=hp["learning_rate"],
        max_length=hp["max_length"],
        gradient_checkpointing=hp["gradient_checkpointing"],
        seed=hp["seed"],
        data_seed=hp["seed"],
        bf16=device == "cuda" and half is torch.bfloat16,
        fp16=device == "cuda" and half is torch.float16,
        # The notebook's paged 8-bit AdamW needs CUDA; plain AdamW on the CPU.
        optim="paged_adamw_8bit" if device == "cuda" else "adamw_torch",
        use_cpu=device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataset_text_field="text",
    )


def train(payload: dict[str, Any], out_dir: Path, reporter: Reporter, settings: Settings) -> TrainOutcome:
    """Train a LoRA adapter for the accepted request ``payload``; save it to ``out_dir`` unless cancelled."""
    hp = payload["hyperparameters"]
    device = pick_device(settings)
    seconds: dict[str, float] = {}

    t = time.monotonic()
    texts = training_texts(payload, settings)
    seconds["data"] = time.monotonic() - t

    t = time.monotonic()
    try:
        tokenizer = load_tokenizer(payload["base_model"], settings)
        model = load_model(payload["base_model"], hp["quantization"], settings)
    except UserFacingError:
        raise
    except OSError as e:  # hub or disk: not found, gated, no network
        raise UserFacingError("model_unavailable", f"could not load base model {payload['base_model']!r}: {e}") from e
    seconds["load"] = time.monotonic() - t

    lora = hp["lora"]
    peft_config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM",
    )
    callback = _ProgressCallback(reporter)
    with tempfile.TemporaryDirectory(prefix="ftaas-train-") as scratch:
        trainer = SFTTrainer(
            model=model, args=_config(hp, device, scratch), train_dataset=texts,
            processing_class=tokenizer, peft_config=peft_config, callbacks=[callback],
        )
        t = time.monotonic()
        trainer.train()
        seconds["train"] = time.monotonic() - t
    steps = trainer.state.global_step
    if callback.cancelled:
        return TrainOutcome(True, steps, callback.losses, seconds)
    if not all(math.isfinite(x) for x in callback.losses):
        raise UserFacingError("diverged", "training loss became NaN or infinite; try a lower learning_rate")

    t = time.monotonic()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)  # type: ignore[union-attr,operator]
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    seconds["save"] = time.monotonic() - t
    log.info("trained %d steps in %s", steps, {k: round(v, 2) for k, v in seconds.items()})
    return TrainOutcome(False, steps, callback.losses, seconds)
