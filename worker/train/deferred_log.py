"""Trainer mixin: a step's log (loss, grad norm) is read back from the device one step later.

Why: transformers logs with ``loss.item()`` and ``grad_norm.item()`` right after the optimizer step, which makes
the host wait until the GPU has finished that step; the host then fetches, collates and packs the next batch and
launches it while the GPU has nothing to do (RESULTS.md T6 call 7: the GPU idle 17 % of a steady step). Deferred,
step N's values are copied to the host without waiting and logged once step N+1 has been queued: the GPU always
has a step of work ahead of the host.

What a log holds does not change: the same values, the same step number, epoch and trl metrics, in the same order
(``state.log_history``, ``on_log`` callbacks). It only happens later: when the next step is queued, or at once
where anything else is due at that step (an evaluation, a checkpoint, the end of training), so evaluations,
checkpoints and the final summary see every step's log before they run. An epoch's end does not wait (the Trainer
calls the log hook there too: waiting drained the GPU's queue every epoch, RESULTS.md run T7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Pending:
    values: torch.Tensor  # the loss sum since the last log [, the grad norm]: on the host once ``ready`` is reached
    ready: torch.cuda.Event | None
    grad_norm: float | None  # when the Trainer gave a number rather than a tensor
    steps: int  # optimizer steps the loss sum covers
    learning_rate: float
    global_step: int
    epoch: float | None
    metrics: dict[str, list[Any]]  # trl's train metrics of those steps
    start_time: float


class DeferredLogs:
    """Mixin for a trl ``SFTTrainer`` subclass (before it in the bases; trl keeps per-step metrics in
    ``_metrics``); on for every device, so the CPU tests run the same logging as the GPU."""

    _pending_log: _Pending | None = None
    # Provided by the Trainer and trl's SFTTrainer:
    state: Any
    control: Any
    _globalstep_last_logged: int
    _total_loss_scalar: float
    _metrics: dict[str, Any]

    def _maybe_log_save_evaluate(self, tr_loss: torch.Tensor, grad_norm: torch.Tensor | float | None, model: Any,
                                 trial: Any, epoch: float, ignore_keys_for_eval: Any, start_time: float,
                                 learning_rate: float | None = None, **kwargs: Any) -> None:
        control = self.control
        due = control.should_log and self.state.global_step > self._globalstep_last_logged
        other = control.should_evaluate or control.should_save or control.should_training_stop
        if not (due or other):
            return  # nothing to do (an epoch's end): the pending log waits, the GPU keeps its queued step
        should_log = control.should_log
        self._flush_log()
        self.control.should_log = should_log  # the flushed log's on_log cleared it
        if due and not other:
            self._defer_log(tr_loss, grad_norm, start_time, learning_rate)
            return
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch,  # type: ignore[misc]
                                         ignore_keys_for_eval, start_time, learning_rate=learning_rate, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        out = super().train(*args, **kwargs)  # type: ignore[misc]
        self._flush_log()  # a safety net: the last step (max_steps or a stop) logs at once, leaving nothing here
        return out

    def _defer_log(self, tr_loss: torch.Tensor, grad_norm: torch.Tensor | float | None, start_time: float,
                   learning_rate: float | None) -> None:
        """What the Trainer's log does before ``.item()``, with the values copied to the host asynchronously."""
        parts = [tr_loss.detach().float().reshape(())]
        if isinstance(grad_norm, torch.Tensor):
            parts.append(grad_norm.detach().float().reshape(()))
        device_values = torch.stack(parts)
        ready = None
        if device_values.is_cuda:
            values = torch.empty(len(parts), dtype=torch.float32, pin_memory=True)
            values.copy_(device_values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            values = device_values
        tr_loss -= tr_loss  # as the Trainer does: the loss sum restarts after each log
        metrics = self._metrics["train"]
        taken = {k: list(v) for k, v in metrics.items()}
        metrics.clear()  # as trl's log does once it has averaged them
        self._pending_log = _Pending(
            values, ready, None if grad_norm is None or isinstance(grad_norm, torch.Tensor) else float(grad_norm),
            self.state.global_step - self._globalstep_last_logged,
            learning_rate if learning_rate is not None else self._get_learning_rate(),  # type: ignore[attr-defined]
            self.state.global_step, self.state.epoch, taken, start_time)
        self._globalstep_last_logged = self.state.global_step
        self.store_flos()  # type: ignore[attr-defined]
        self.control.should_log = False  # as the Trainer's on_log leaves it

    def _flush_log(self) -> None:
        """Log the deferred step, if any, as of its own step (waits for that step's GPU work only)."""
        pending, self._pending_log = self._pending_log, None
        if pending is None:
            return
        if pending.ready is not None:
            pending.ready.synchronize()
        loss, *norm = pending.values.tolist()
        self._total_loss_scalar += loss
        logs = {"loss": loss / pending.steps}
        if norm or pending.grad_norm is not None:
            logs["grad_norm"] = norm[0] if norm else pending.grad_norm
        logs["learning_rate"] = pending.learning_rate
        state = self.state
        now = state.global_step, state.epoch, self._metrics["train"]
        state.global_step, state.epoch, self._metrics["train"] = pending.global_step, pending.epoch, pending.metrics
        try:
            self.log(logs, pending.start_time)  # type: ignore[attr-defined]
        finally:
            state.global_step, state.epoch, self._metrics["train"] = now
