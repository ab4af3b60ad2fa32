"""How the CLI shows things: tables of jobs and datasets, a job's details, and the end-of-training summary."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def console(stderr: bool = False) -> Console:
    """A console on the current stdout (or stderr): made per use so test runners' streams are honoured."""
    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def progress_of(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    return f"{p.get('step', 0)}/{p.get('total_steps', '?')}"


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(title=None, show_edge=False)
    for name in ("id", "status", "step", "loss", "base model", "name", "created"):
        table.add_column(name, no_wrap=name in ("id", "status", "step", "created"))
    for j in jobs:
        status = Text(j["status"], style=STATUS_STYLE.get(j["status"], ""))
        table.add_row(j["id"], status, progress_of(j), num((j.get("metrics") or {}).get("loss")),
                      str(j.get("request", {}).get("base_model", "-")), j.get("name") or "", when(j.get("created_at")))
    return table


def datasets_table(items: list[dict[str, Any]]) -> Table:
    table = Table(show_edge=False)
    for name in ("id", "filename", "format", "rows", "bytes", "columns", "created"):
        table.add_column(name, no_wrap=name in ("id", "format", "rows", "bytes", "created"))
    for d in items:
        table.add_row(d["id"], d.get("filename", ""), d.get("format", ""), str(d.get("row_count", "")),
                      f"{d.get('bytes', 0):,}", ", ".join(d.get("columns", [])), when(d.get("created_at")))
    return table


STATUS_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "magenta"}


def job_details(job: dict[str, Any]) -> Table:
    """Key/value rows: status, times, progress, metrics, request, dataset stats, evaluation, error."""
    table = Table(show_header=False, show_edge=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    req = job.get("request") or {}
    hp = req.get("hyperparameters") or {}
    rows: list[tuple[str, str]] = [
        ("id", job["id"]), ("status", job["status"]), ("name", job.get("name") or "-"),
        ("base model", str(req.get("base_model", "-"))), ("dataset", _dataset_of(req.get("dataset") or {})),
        ("format", str(req.get("format", "-"))),
        ("created", when(job.get("created_at"))), ("started", when(job.get("started_at"))),
        ("finished", when(job.get("finished_at"))),
        ("progress", progress_of(job) + _eta(job)),
        ("metrics", ", ".join(f"{k} {num(v)}" for k, v in (job.get("metrics") or {}).items() if v is not None) or "-"),
        ("hyperparameters", ", ".join(f"{k}={hp[k]}" for k in ("max_steps", "learning_rate", "batch_size",
                                                              "gradient_accumulation_steps", "max_length", "seed")
                                      if k in hp)),
    ]
    stats = job.get("dataset_stats")
    if stats:
        rows.append(("dataset stats", _stats_line(stats)))
    if job.get("cancel_requested") and job["status"] == "running":
        rows.append(("cancel", "requested: stops at its next step"))
    if job.get("error"):
        rows.append(("error", f"{job['error']['code']}: {job['error']['message']}"))
    if job.get("adapter"):
        rows.append(("adapter", job["adapter"]))
    for key, value in rows:
        table.add_row(key, Text(value))
    return table


def _dataset_of(ds: dict[str, Any]) -> str:
    if "rows" in ds:
        return f"{ds['rows'].get('count', '?')} inline rows"
    if "hub" in ds:
        return f"hub {ds['hub'].get('name')} ({ds['hub'].get('split', 'train')})"
    return str(ds.get("id", "-"))


def _eta(job: dict[str, Any]) -> str:
    eta = (job.get("progress") or {}).get("eta_seconds")
    return f" (eta {eta:.0f} s)" if job["status"] == "running" and eta is not None else ""


def _stats_line(stats: dict[str, Any]) -> str:
    dropped = stats.get("rows_dropped") or {}
    parts = [f"format {stats.get('format')}", f"{stats.get('rows_used')}/{stats.get('rows_total')} rows used"]
    if dropped:
        parts.append("dropped: " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    if stats.get("validation_rows"):
        parts.append(f"{stats.get('train_rows')} train / {stats['validation_rows']} validation")
    if stats.get("epochs") is not None:
        parts.append(f"{stats['epochs']:.2f} epochs")
    tokens = stats.get("tokens")
    if tokens:
        parts.append(f"tokens mean {tokens['mean']:.0f}, p95 {tokens['p95']}, max {tokens['max']}")
    return "; ".join(parts)


def print_evaluation(out: Console, job: dict[str, Any]) -> None:
    """eval_loss before/after and each sample prompt's continuation before and after training."""
    ev = job.get("evaluation") or {}
    before, after = ev.get("eval_loss_before"), ev.get("eval_loss_after")
    if before is None and after is None:
        out.print("eval_loss: - (no validation set)")
    else:
        change = ev.get("relative_change")
        out.print(f"eval_loss: {num(before)} -> {num(after)}" + (f" ({change:+.1%})" if change is not None else ""))
    for i, s in enumerate(ev.get("samples") or [], 1):
        out.print(Text(f"sample {i}: {s['prompt']!r}", style="bold"))
        out.print(Text(f"  before: {s.get('before')!r}"))
        out.print(Text(f"  after:  {s.get('after')!r}"))


def print_summary(out: Console, job: dict[str, Any]) -> None:
    """The end of ``train --follow`` and ``job``: the outcome, the adapter and the evaluation."""
    status = job["status"]
    took = (job.get("finished_at") or 0) - (job.get("started_at") or job.get("finished_at") or 0)
    out.print(Text(f"{job['id']} {status} at step {progress_of(job)}" + (f" in {took:.1f} s" if took > 0 else ""),
                   style=STATUS_STYLE.get(status, "")))
    if job.get("adapter"):
        out.print(f"adapter: {job['adapter']}  (ftaas generate --adapter {job['adapter']} PROMPT)")
    if job.get("evaluation"):
        print_evaluation(out, job)
