"""``train --follow``: a live progress bar fed by the job's SSE event stream, and Ctrl-C to cancel."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from app.cli.client import Client, CliError
from app.cli.views import num

TERMINAL = ("succeeded", "failed", "cancelled")
_PHASE = {"queued": "queued", "started": "running", "cancel_requested": "cancelling", "adapter_saved": "saving",
          "succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}


class Follower:
    """Draws one job's events as a progress bar: step/total, loss, eval loss and ETA."""

    def __init__(self, out: Console, job: dict[str, Any]) -> None:
        self.out, self.job_id = out, job["id"]
        self.last_id: str | None = None
        self.progress = Progress(
            TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("eval {task.fields[eval_loss]}"),
            TextColumn("eta"), TimeRemainingColumn(), console=out)
        p = job.get("progress") or {}
        self.task: TaskID = self.progress.add_task(job["status"], total=p.get("total_steps"),
                                                   completed=p.get("step", 0), loss="-", eval_loss="-")

    def on_event(self, ev: dict[str, Any]) -> None:
        kind, data = ev["type"], ev.get("data") or {}
        self.last_id = ev["id"]
        if kind == "step":
            self.progress.update(self.task, completed=data.get("step", 0), total=data.get("total_steps"),
                                 loss=num(data.get("loss")), description="running")
        elif kind == "eval":
            self.progress.update(self.task, eval_loss=num(data.get("eval_loss")))
        elif kind == "dataset_stats":
            tokens = data.get("tokens") or {}
            self.progress.console.print(
                f"dataset: {data.get('rows_used', '?')} rows used ({data.get('format', '?')})"
                + (f", {data['validation_rows']} held out for eval" if data.get("validation_rows") else "")
                + (f", tokens p95 {tokens['p95']}" if tokens else ""))
        if kind in _PHASE:
            self.progress.update(self.task, description=_PHASE[kind])

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
