"""The notebook's recipe as a plain function: NF4 base + LoRA (peft) + trl SFTTrainer, with evaluation.

No Celery here: ``train`` takes the accepted job request and a ``Reporter`` and can run alone.
Every job measures eval loss on held-out rows before, during and after training, and generates
from a few prompts before and after (the notebook's before/after cells, done automatically).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import LoraConfig
from transformers import (
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from app.core.errors import UserFacingError
from app.core.jobs import JobPhase, JobSpec, SpecHyperparameters
from app.core.settings import Settings
from worker.models import compute_dtype, load_model, load_tokenizer, pick_device
from worker.nf4 import dequantize_nf4
from worker.train import checkpoints
from worker.train.checkpoints import CheckpointCallback, KeepAdapterDtypeOnResume
from worker.train.data import PreparedData, prepare
from worker.train.fast_path import (
    FastSFTTrainer,
    auto_token_budget,
    compile_decoder_layers,
    pack_budget,
)
from worker.train.fused import fuse_gemma_norms, fuse_lora_linears
from worker.train.phases import PhaseClock
from worker.train.samples import generate_texts

log = logging.getLogger("ftaas.trainer")

SAMPLE_TOKENS = 32
_LOGGED = ("loss", "learning_rate", "epoch", "grad_norm")


class Reporter(Protocol):
    def progress(self, step: int, total_steps: int, eta_seconds: float | None, metrics: dict[str, float],
                 point: dict[str, Any]) -> None: ...
    def evaluated(self, point: dict[str, Any]) -> None: ...
    def event(self, kind: str, data: dict[str, Any], record: dict[str, Any] | None = None) -> None: ...
    def phase(self, progress: dict[str, Any]) -> None: ...
    def should_stop(self) -> bool: ...


@dataclass
class TrainOutcome:
    cancelled: bool
    steps: int
    losses: list[float]
    seconds: dict[str, float]
    evaluation: dict[str, Any] = field(default_factory=dict)
    preempted: bool = False  # stopped by the worker's shutdown after a checkpoint: the job resumes later


class _ProgressCallback(TrainerCallback):
    """Reports each logging step, evaluation and phase (with the clock's ETA for the whole job); stops
    training at the next step once cancelled."""

    def __init__(self, reporter: Reporter, clock: PhaseClock, label: str = "") -> None:
        self.reporter, self.clock, self.label = reporter, clock, label
        self.cancelled = False
        self.losses: list[float] = []
        self.t0 = time.monotonic()
        self.eval_batch = 0

    def enter(self, phase: JobPhase, total: int | None = None) -> None:
        self.reporter.phase(self.clock.enter(phase, total))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.t0 = time.monotonic()
        self.clock.stepped(state.global_step)  # a resumed run starts at its checkpoint
        self.enter("training", state.max_steps)

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kwargs: Any) -> None:
        """An evaluation batch is done: the evaluation phases show it (those inside training do not)."""
        self.eval_batch += 1
        if self.clock.phase in ("evaluating_before", "evaluating_after"):
            self.reporter.phase(self.clock.advance(self.eval_batch))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self.clock.stepped(state.global_step)
        if self.reporter.should_stop():
            self.cancelled = True
            control.should_training_stop = True

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        step, total = state.global_step, state.max_steps
        point: dict[str, Any] = {"step": step, "time": round(time.monotonic() - self.t0, 3)}
        if "eval_loss" in logs:
            point["eval_loss"] = float(logs["eval_loss"])
            self.reporter.evaluated(point)
            return
        if "loss" not in logs:
            return  # the end-of-training summary, not a step
        metrics = {k: float(logs[k]) for k in _LOGGED if isinstance(logs.get(k), int | float)}
        self.losses.append(metrics["loss"])
        point |= {"loss": metrics["loss"], "learning_rate": metrics.get("learning_rate"),
                  "tokens_seen": int(logs["num_tokens"]) if "num_tokens" in logs else None}
        eta = self.clock.eta_seconds()  # the whole job's: this run's step rate, evaluations and sampling
        log.info("%sstep %d/%d loss %.4f lr %.3g grad_norm %s eta %s", f"{self.label} " if self.label else "",
                 step, total, metrics["loss"], metrics.get("learning_rate", 0.0),
                 f"{metrics['grad_norm']:.3g}" if "grad_norm" in metrics else "-",
                 f"{eta:.0f}s" if eta is not None else "-")
        self.reporter.progress(step, total, eta, metrics, point)


class _TimedEval:
    """Trainer mixin: each evaluation's seconds go to the job's phase clock (for the ETA)."""

    clock: PhaseClock | None = None

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        t = time.monotonic()
        try:
            return super().evaluate(*args, **kwargs)  # type: ignore[misc,no-any-return]
        finally:
            if self.clock is not None:
                self.clock.evaluated(time.monotonic() - t)


def eval_steps(hp: SpecHyperparameters) -> int:
    """Steps between the evaluations during training (when the job has a validation set)."""
    return hp.eval_interval or max(1, hp.max_steps // 5)


def _config(hp: SpecHyperparameters, device: str, output_dir: str, data: PreparedData, fast: bool = False) -> SFTConfig:
    half = compute_dtype(device)
    evaluating = data.validation is not None
    # The fast path (worker/train/fast_path.py) takes each step's whole effective batch as one Trainer batch.
    per_step = hp.examples_per_step
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=per_step if fast else hp.batch_size,
        per_device_eval_batch_size=64 if fast else max(hp.batch_size, 8),
        gradient_accumulation_steps=1 if fast else hp.gradient_accumulation_steps,
        warmup_steps=hp.warmup_steps,
        max_steps=hp.max_steps,
        learning_rate=hp.learning_rate,
        max_length=hp.max_length,
        gradient_checkpointing=hp.gradient_checkpointing,
        seed=hp.seed,
        data_seed=hp.seed,
        bf16=device == "cuda" and half is torch.bfloat16,
        fp16=device == "cuda" and half is torch.float16,
        # The notebook's paged 8-bit AdamW needs CUDA; plain AdamW on the CPU; the fast path: fused AdamW.
        optim=("adamw_torch_fused" if fast else "paged_adamw_8bit") if device == "cuda" else "adamw_torch",
        use_cpu=device == "cpu",
        logging_steps=1,
        # transformers' default logs a NaN/inf step loss as the average of the steps since the last log, i.e. 0.0
        # when logging every step: a diverged job then looked fine. Log it as it is (``train`` fails the job).
        logging_nan_inf_filter=False,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=eval_steps(hp),
        assistant_only_loss=data.format == "messages",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def _ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Chat data needs a template; the GGUF-built Gemma 3 tokenizer has none, so use trl's Gemma 3
    training template (it marks assistant turns with ``{% generation %}`` for the loss mask)."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = resources.files("trl").joinpath("chat_templates/gemma3_training.jinja").read_text()


def _prompt_texts(data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [p if isinstance(p, str) else
            str(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True))
            for p in data.sample_prompts]


def _token_stats(data: PreparedData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, Any]:
    texts = [e["text"] if "text" in e else e["prompt"] + e["completion"] if "prompt" in e
             else str(tokenizer.apply_chat_template(e["messages"], tokenize=False)) for e in data.train]
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    return {"mean": round(sum(lengths) / len(lengths), 1), "p95": p95, "max": lengths[-1],
            "over_max_length": sum(n > max_length for n in lengths)}


class _Trainer(_TimedEval, KeepAdapterDtypeOnResume, SFTTrainer):
    pass


class _FastTrainer(_TimedEval, KeepAdapterDtypeOnResume, FastSFTTrainer):
    pass


def build_trainer(spec: JobSpec, reporter: Reporter, settings: Settings, output_dir: str,
                  label: str = "") -> tuple[SFTTrainer, PreparedData, _ProgressCallback, dict[str, float]]:
    """Data, tokenizer, NF4 model and the SFTTrainer for a job, ready to train (tests inspect it). The
    callback holds the job's phase clock; ``label`` starts the step log lines (the job id)."""
    hp = spec.hyperparameters
    device = pick_device(settings)
    seconds: dict[str, float] = {}
    t = time.monotonic()
    clock = PhaseClock(hp.max_steps, None)  # its evaluation interval once the data says there is a validation set
    reporter.phase(clock.progress())
    data = prepare(spec, settings)
    try:
        tokenizer = load_tokenizer(spec.base_model, settings)
        if data.format == "messages":
            _ensure_chat_template(tokenizer)
        data.stats["tokens"] = _token_stats(data, tokenizer, hp.max_length)
        seconds["data"] = time.monotonic() - t
        reporter.event("dataset_stats", data.stats, {"dataset_stats": data.stats})
        t = time.monotonic()
        reporter.phase(clock.enter("loading_model"))
        model = load_model(spec.base_model, hp.quantization, settings)
        fast = settings.train_fast_path
        if fast and device == "cuda" and settings.train_dequantize and hp.quantization == "nf4":
            model = dequantize_nf4(model, compute_dtype(device))
    except UserFacingError:
        raise
    except OSError as e:  # hub or disk: not found, gated, no network
        raise UserFacingError("model_unavailable", f"could not load base model {spec.base_model!r}: {e}") from e
    seconds["load"] = time.monotonic() - t

    lora = hp.lora
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
    )
    clock.eval_steps = eval_steps(hp) if data.validation is not None else None
    callback = _ProgressCallback(reporter, clock, label)
    extra: dict[str, Any] = {}
    if fast:
        budget = auto_token_budget(model, device, hp.gradient_checkpointing, settings.train_memory_gib,
                                   settings.train_token_budget)
        if settings.train_packing and not settings.train_token_budget:  # a budget set by hand is taken as is
            budget = pack_budget(budget)
        extra = {"token_budget": budget,
                 "packing": settings.train_packing, "cuda_graphs": settings.train_cuda_graphs}
    trainer = (_FastTrainer if fast else _Trainer)(
        model=model, args=_config(hp, device, output_dir, data, fast), train_dataset=data.train,
        eval_dataset=data.validation, processing_class=tokenizer, peft_config=peft_config, callbacks=[callback],
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict (to the worker log at WARNING level)
    trainer.clock = clock  # type: ignore[attr-defined]
    if fast and device == "cuda" and settings.train_fused_kernels:
        log.info("fused %d norms and %d LoRA projections", fuse_gemma_norms(trainer.model),  # type: ignore[arg-type]
                 fuse_lora_linears(trainer.model))  # type: ignore[arg-type]
    examples = hp.max_steps * hp.examples_per_step
    if (fast and device == "cuda" and not hp.gradient_checkpointing and settings.train_compile_min_examples
            and examples >= settings.train_compile_min_examples):
        log.info("compiled %d decoder layers for training", compile_decoder_layers(trainer.model))  # type: ignore[arg-type]
        trainer.cuda_graphs = False  # type: ignore[union-attr]  # compiled layers are not captured
    return trainer, data, callback, seconds


def _base_only(trainer: SFTTrainer) -> AbstractContextManager[Any]:
    """Before training LoRA's B matrices are still zero (peft's default init; a resumed checkpoint is loaded
    inside ``trainer.train``), so the adapted model computes exactly the base's numbers: skip the LoRA branches
    (about a third of the launches of each forward) for the evaluation and samples before training."""
    disable = getattr(trainer.model, "disable_adapter", None)
    return disable() if callable(disable) else nullcontext()


def _final_eval_loss(trainer: SFTTrainer) -> float | None:
    """The eval loss the Trainer measured at the last step, if it evaluated there (the weights are final)."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return float(entry["eval_loss"])
    return None


def _evaluate(trainer: SFTTrainer, callback: _ProgressCallback, phase: JobPhase) -> float:
    """The eval loss, measured as the job's ``phase``, whose progress is the evaluation's batches."""
    callback.eval_batch = 0
    callback.enter(phase, len(trainer.get_eval_dataloader()))
    return float(trainer.evaluate()["eval_loss"])


def _samples(trainer: SFTTrainer, tokenizer: PreTrainedTokenizerBase, prompts: list[str], seed: int) -> list[str]:
    model = trainer.model
    was_training = model.training  # type: ignore[union-attr]
    model.eval()  # type: ignore[union-attr]
    outs = generate_texts(model, tokenizer, prompts, SAMPLE_TOKENS, seed=seed, bf16_head=True)
    model.train(was_training)  # type: ignore[union-attr]
    return [o["text"] for o in outs]


def train(spec: JobSpec, out_dir: Path, reporter: Reporter, settings: Settings,
          checkpoint_dir: Path | None = None, preempt: Callable[[], bool] | None = None) -> TrainOutcome:
    """Train a LoRA adapter for the accepted job ``spec``; save it to ``out_dir`` unless cancelled.

    With ``checkpoint_dir``: checkpoints there (worker/train/checkpoints.py), resuming from the latest one;
    once ``preempt()`` holds, saves one and returns a ``preempted`` outcome.
    """
    seed = spec.hyperparameters.seed
    with tempfile.TemporaryDirectory(prefix="ftaas-train-") as scratch:
        trainer, data, callback, seconds = build_trainer(spec, reporter, settings, str(checkpoint_dir or scratch),
                                                         out_dir.name)
        saver = CheckpointCallback(settings.checkpoint_interval if checkpoint_dir else 0, preempt,
                                   lambda: callback.cancelled)
        trainer.add_callback(saver)
        resume = checkpoints.latest(checkpoint_dir)
        if resume is not None:
            reporter.event("resumed", {"step": checkpoints.step_of(resume)})
        tokenizer = trainer.processing_class
        prompts = _prompt_texts(data, tokenizer)  # type: ignore[arg-type]
        t = time.monotonic()
        evaluation: dict[str, Any] = {}
        with _base_only(trainer):
            if data.validation is not None:
                evaluation["eval_loss_before"] = _evaluate(trainer, callback, "evaluating_before")
            callback.enter("sampling_before")
            before = _samples(trainer, tokenizer, prompts, seed)  # type: ignore[arg-type]
        seconds["eval"] = time.monotonic() - t

        t = time.monotonic()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds["train"] = time.monotonic() - t
        steps = trainer.state.global_step
        if callback.cancelled:
            return TrainOutcome(True, steps, callback.losses, seconds)
        if saver.preempted:
            return TrainOutcome(False, steps, callback.losses, seconds, preempted=True)
        if not all(math.isfinite(x) for x in callback.losses):
            raise UserFacingError("diverged", "training loss became NaN or infinite; try a lower learning_rate")

        t = time.monotonic()
        if data.validation is not None:
            final = _final_eval_loss(trainer)  # the periodic evals end at the last step when it is a multiple
            evaluation["eval_loss_after"] = (final if final is not None
                                             else _evaluate(trainer, callback, "evaluating_after"))
            before_loss = evaluation["eval_loss_before"]
            evaluation["relative_change"] = round((evaluation["eval_loss_after"] - before_loss) / before_loss, 4)
        callback.enter("sampling_after")
        after = _samples(trainer, tokenizer, prompts, seed)  # type: ignore[arg-type]
        evaluation["samples"] = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after,
                                                                                          strict=True)]
        seconds["eval"] += time.monotonic() - t

    t = time.monotonic()
    callback.enter("saving")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)  # type: ignore[union-attr,operator]
    tokenizer.save_pretrained(tmp)  # type: ignore[union-attr]
    tmp.rename(out_dir)
    seconds["save"] = time.monotonic() - t
    reporter.event("adapter_saved", {"adapter": out_dir.name, "seconds": {k: round(v, 2) for k, v in seconds.items()}})
    log.info("trained %d steps in %s", steps, {k: round(v, 2) for k, v in seconds.items()})
    return TrainOutcome(False, steps, callback.losses, seconds, evaluation)
