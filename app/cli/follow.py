"""``train --follow``: a live progress bar fed by the job's SSE event stream, and Ctrl-C to cancel."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from app.cli.client import Client, CliError
from app.cli.views import num

TERMINAL = ("succeeded", "failed", "cancelled")
#: What the bar says in each phase of a job (app/core/jobs.py PHASES) and at the other events.
PHASE_WORDS = {"queued": "queued", "preparing_data": "preparing data", "loading_model": "loading model",
               "evaluating_before": "evaluating (before)", "sampling_before": "sampling (before)",
               "training": "training", "evaluating_after": "evaluating (after)",
               "sampling_after": "sampling (after)", "saving": "saving"}
_STATUS_WORDS = {"queued": "queued", "cancel_requested": "cancelling", "succeeded": "succeeded", "failed": "failed",
                 "cancelled": "cancelled", "requeued": "queued"}


def eta_text(eta: float | None) -> str:
    """The whole job's ETA as the server measured it; "estimating" until it has a rate to base one on."""
    if eta is None:
        return "estimating"
    minutes, seconds = divmod(round(eta), 60)
    return f"{minutes}:{seconds:02d}"


class Follower:
    """Draws one job's events as a progress bar: the phase (with its own progress), step/total, loss, eval loss
    and the ETA of the whole job (the server's, from measured rates: rich's own guess from the bar's speed
    knows nothing of evaluation and sampling)."""

    def __init__(self, out: Console, job: dict[str, Any]) -> None:
        self.out, self.job_id = out, job["id"]
        self.last_id: str | None = None
        self.progress = Progress(
            TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("eval {task.fields[eval_loss]}"),
            TextColumn("eta {task.fields[eta]}"), console=out)
        p = job.get("progress") or {}
        self.task: TaskID = self.progress.add_task(
            self._phase_words(p.get("phase"), p.get("phase_progress") or {}) or job["status"],
            total=p.get("total_steps"), completed=p.get("step", 0), loss="-", eval_loss="-",
            eta=eta_text(p.get("eta_seconds")) if job["status"] == "running" else "-")

    @staticmethod
    def _phase_words(phase: str | None, within: dict[str, Any]) -> str | None:
        if phase not in PHASE_WORDS:
            return None
        words = PHASE_WORDS[phase]
        if phase != "training" and within.get("total"):
            words += f" {within.get('done', 0)}/{within['total']}"
        return words

    def on_event(self, ev: dict[str, Any]) -> None:
        kind, data = ev["type"], ev.get("data") or {}
        self.last_id = ev["id"]
        if kind == "phase":
            self.progress.update(self.task, description=self._phase_words(data.get("phase"), data) or "running",
                                 eta=eta_text(data.get("eta_seconds")))
        elif kind == "step":
            self.progress.update(self.task, completed=data.get("step", 0), total=data.get("total_steps"),
                                 loss=num(data.get("loss")), description="training",
                                 eta=eta_text(data.get("eta_seconds")))
        elif kind == "eval":
            self.progress.update(self.task, eval_loss=num(data.get("eval_loss")))
        elif kind == "dataset_stats":
            tokens = data.get("tokens") or {}
            self.progress.console.print(
                f"dataset: {data.get('rows_used', '?')} rows used ({data.get('format', '?')})"
                + (f", {data['validation_rows']} held out for eval" if data.get("validation_rows") else "")
                + (f", tokens p95 {tokens['p95']}" if tokens else ""))
        if kind in _STATUS_WORDS:
            self.progress.update(self.task, description=_STATUS_WORDS[kind],
                                 eta="-" if kind in TERMINAL else eta_text(None))

    def run(self, client: Client) -> bool:
        """Follow until the job ends (True), or until the user detaches (False).

        Ctrl-C asks whether to cancel the job: yes cancels it and follows it to its end; no detaches.
        """
        announce = True
        while True:
            try:
                if announce:  # inside the try: a Ctrl-C right after this line is already handled
                    self.out.print(f"following {self.job_id} (Ctrl-C to cancel or detach)")
                    announce = False
                self.progress.start()
                for ev in client.events(self.job_id, self.last_id):
                    self.on_event(ev)
                return True
            except KeyboardInterrupt:
                self.progress.stop()
                self.out.print()
                if not typer.confirm(f"Cancel job {self.job_id}?", default=False):
                    return False
                try:
                    job = client.post(f"/jobs/{self.job_id}/cancel")
                    self.out.print(f"{self.job_id}: cancel requested (status {job['status']})")
                except CliError as e:
                    if e.code != "job_finished":
                        raise
                    self.out.print(f"{self.job_id}: {e.message}")
            finally:
                self.progress.stop()


def follow(client: Client, out: Console, job: dict[str, Any]) -> dict[str, Any] | None:
    """Stream the job's progress until it ends: the final job record; None when the user detached."""
    if not Follower(out, job).run(client):
        out.print(f"detached; {job['id']} keeps running (ftaas job {job['id']} --follow to watch again)")
        return None
    final: dict[str, Any] = client.get(f"/jobs/{job['id']}")
    return final
