"""How ``bench/train_bench.py`` runs and times one variant: ``run_variant`` (build_trainer + trainer.train(), no
validation split) and ``run_job`` (a whole job through ``worker.train.recipe.train``), the job spec they train
(``payload_for``), the step clock and profiler callbacks, and the MFU's peak rate.

Imported as ``train_runs`` from the scripts in bench/ (bench/ and the repository root are on ``sys.path``).
"""

from __future__ import annotations

import gc
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from common import HUB_ID, RecordingReporter, log
from transformers import TrainerCallback

import worker.train.recipe
from app.core.jobs import JobCreate, JobSpec
from app.core.settings import Settings

PEAK_FLOPS = 790e12


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Only the times read below wait for the GPU: a wait every step would stop the host from queueing the next
        # step while the GPU runs this one (what the fast path's deferred logs allow).
        if torch.cuda.is_available() and state.global_step in (1, 2, state.max_steps):
            torch.cuda.synchronize()
        self.times.append(time.monotonic())


class Profile(TrainerCallback):
    """torch.profiler over optimizer steps ``first``..``last`` (1-based); prints the top ops by GPU time."""

    def __init__(self, out: str, first: int = 4, last: int = 5) -> None:
        self.out, self.first, self.last = out, first, last
        self.prof: Any = None
        self.t0 = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == self.first:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.start()
            self.t0 = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.prof is None or state.global_step != self.last:
            return
        torch.cuda.synchronize()
        wall = time.monotonic() - self.t0
        self.prof.stop()
        avg = self.prof.key_averages()
        key = "self_device_time_total" if hasattr(avg[0], "self_device_time_total") else "self_cuda_time_total"
        busy = sum(getattr(e, key) for e in avg) / 1e6
        table = avg.table(sort_by=key, row_limit=14, max_name_column_width=60)
        cpu = avg.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60)
        log(f"PROFILE steps {self.first}-{self.last}: wall {wall:.3f} s, GPU busy {busy:.3f} s "
            f"({100 * busy / wall:.0f} %)")
        log(table)
        if self.out:
            Path(self.out).mkdir(parents=True, exist_ok=True)
            (Path(self.out) / "profile.txt").write_text(table + "\n" + cpu + "\n" + avg.table(
                sort_by=key, row_limit=60, max_name_column_width=200))
        self.prof = None


def payload_for(rows: list[dict[str, Any]], hp: dict[str, Any], validation: float | None) -> JobSpec:
    """The job spec the API would store (app/api/services/jobs.py builds it the same way)."""
    body: dict[str, Any] = {"base_model": HUB_ID, "dataset": {"rows": rows}, "hyperparameters": {"seed": 42} | hp}
    if validation is not None:
        body["validation"] = {"fraction": validation}
    return JobSpec.from_request(JobCreate.model_validate(body), HUB_ID, default_seed=42)


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_variant(name: str, rows: list[dict[str, Any]], hp: dict[str, Any], settings: Settings,
                work: Path, nparams: int, tweak: Any = None, profile: str | None = None) -> dict[str, Any]:
    """build_trainer + trainer.train() with no validation split; tokens/s from trl's own token count."""
    free_gpu()
    t = time.monotonic()
    payload = payload_for(rows, hp, 0.0)
    hp = payload.hyperparameters.model_dump()
    trainer, data, callback, seconds = worker.train.recipe.build_trainer(
        payload, RecordingReporter(), settings, str(work / name))
    clock = StepClock()
    trainer.add_callback(clock)
    if profile is not None and torch.cuda.is_available():
        trainer.add_callback(Profile(profile))
    if tweak is not None:
        tweak(trainer)
    setup_s = time.monotonic() - t
    t0 = time.monotonic()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    train_s = time.monotonic() - t0
    logs = [p for p in trainer.state.log_history if "loss" in p]
    tokens = [int(p["num_tokens"]) for p in logs]
    steps = trainer.state.global_step
    per_step = hp["batch_size"] * hp["gradient_accumulation_steps"]
    r: dict[str, Any] = {
        "variant": name, "steps": steps, "examples": steps * per_step, "setup_s": setup_s, "load_s": seconds["load"],
        "train_s": train_s, "tokens": tokens[-1] if tokens else None, "final_loss": logs[-1]["loss"] if logs else None,
        "token_budget": getattr(trainer, "token_budget", None),
        "micro_batches_per_step": statistics.mean(getattr(trainer, "micro_batch_counts", [0]) or [0]),
        "capture_s": getattr(getattr(trainer, "_runner", None), "capture_seconds", None),
        "graphs": len(getattr(getattr(trainer, "_runner", None), "graphs", {})),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    if tokens:
        r["tokens_per_s"] = tokens[-1] / train_s
        r["samples_per_s"] = r["examples"] / train_s
        r["mfu"] = r["tokens_per_s"] * 4 * nparams / PEAK_FLOPS
        if clock.times:
            r["first_step_s"] = clock.times[0] - t0
        if len(clock.times) > 3 and len(tokens) == len(clock.times):
            r["steady_tokens_per_s"] = (tokens[-1] - tokens[1]) / (clock.times[-1] - clock.times[1])
    del trainer, data, callback
    return r


def run_job(rows: list[dict[str, Any]], settings: Settings, nparams: int, hp: dict[str, Any],
            name: str = "job") -> dict[str, Any]:
    """A whole default job (the API's body: dataset rows only) through worker.train.recipe.train."""
    free_gpu()
    timed = {"samples": 0.0, "build": 0.0}
    samples, build = worker.train.recipe._samples, worker.train.recipe.build_trainer

    def timing(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                timed[name] += time.monotonic() - t0
        return wrapped

    timed_samples, timed_build = timing("samples", samples), timing("build", build)
    worker.train.recipe._samples, worker.train.recipe.build_trainer = timed_samples, timed_build  # type: ignore[assignment]
    payload = payload_for(rows, hp, None)
    job_id = "job_" + uuid.uuid4().hex[:22]
    out = settings.adapter_dir / job_id
    out.parent.mkdir(parents=True, exist_ok=True)
    reporter = RecordingReporter()
    t = time.monotonic()
    try:
        outcome = worker.train.recipe.train(payload, out, reporter, settings)
    finally:
        worker.train.recipe._samples, worker.train.recipe.build_trainer = samples, build  # type: ignore[assignment]
    total = time.monotonic() - t
    hp = payload.hyperparameters.model_dump()
    tokens = reporter.tokens_seen()
    parts = outcome.seconds
    r = {"variant": name, "total_s": total, **{f"{k}_s": v for k, v in parts.items()},
         "setup_s": timed["build"] - parts.get("data", 0) - parts.get("load", 0), "samples_s": timed["samples"],
         "first_step_s": reporter.points[0]["time"] if reporter.points else None,
         "steps": outcome.steps, "examples": outcome.steps * hp["batch_size"] * hp["gradient_accumulation_steps"],
         "tokens": tokens, "final_loss": outcome.losses[-1] if outcome.losses else None,
         "adapter_ok": (out / "adapter_model.safetensors").is_file(),
         "eval": {k: v for k, v in outcome.evaluation.items() if k != "samples"},
         "sample": (outcome.evaluation.get("samples") or [None])[0],
         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    if tokens and outcome.seconds.get("train"):
        r["tokens_per_s"] = tokens / outcome.seconds["train"]
        r["samples_per_s"] = r["examples"] / outcome.seconds["train"]
        r["mfu"] = r["tokens_per_s"] * 4 * nparams / PEAK_FLOPS
    return r

