"""Training formats and row checks, shared by the API (before queueing) and the worker (before training).

Formats: ``template`` (str.format over any columns), ``text`` (one column as is),
``prompt_completion`` (loss on the completion only) and ``messages`` (OpenAI-style chat, loss on
assistant turns only). ``auto`` picks one from the columns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from app.core.errors import UserFacingError
from app.core.jobs import ValidationSpec, template_fields

Format = Literal["template", "text", "prompt_completion", "messages"]


def detect_format(requested: str, template_given: bool, columns: Iterable[str]) -> Format:
    """The format a job trains with: the requested one, or from the columns when ``auto``."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    cols = set(columns)
    if template_given:
        return "template"
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols and not {"quote", "author"} <= cols:
        return "text"
    return "template"


def required_columns(fmt: Format, template: str) -> list[str]:
    return {"template": lambda: template_fields(template), "text": lambda: ["text"],
            "prompt_completion": lambda: ["prompt", "completion"], "messages": lambda: ["messages"]}[fmt]()


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value == []


def drop_reason(fmt: Format, required: Sequence[str], row: dict[str, Any]) -> str | None:
    """Why a row cannot be trained on, or None when it can."""
    for col in required:
        if col not in row:
            return f"missing field '{col}'"
    if fmt == "template":
        return "empty" if all(_blank(row[c]) for c in required) else None
    if any(_blank(row[c]) for c in required):
        return "empty"
    if fmt == "messages":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            return "messages must be a list of {role, content} objects"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant message"
    return None


def row_stats(fmt: Format, template: str, rows: Iterable[dict[str, Any]]) -> tuple[list[int], dict[str, int]]:
    """Indices of usable rows, and how many were dropped for each reason."""
    required = required_columns(fmt, template)
    kept: list[int] = []
    dropped: Counter[str] = Counter()
    for i, row in enumerate(rows):
        reason = drop_reason(fmt, required, row)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(i)
    return kept, dict(dropped)


def missing_everywhere(fmt: Format, template: str, columns: Iterable[str]) -> list[str]:
    """Required columns the dataset has in no row: the job cannot run at all."""
    cols = set(columns)
    return [c for c in required_columns(fmt, template) if c not in cols]


def columns_of(rows: Iterable[dict[str, Any]]) -> set[str]:
    """Every column name of any row."""
    return set().union(*(r.keys() for r in rows))


def check_rows(fmt: Format, template: str, rows: list[dict[str, Any]], where: str) -> tuple[list[int], dict[str, int]]:
    """The one check of a job's rows, by the API before queueing and by the worker before training: every
    column the format needs is in some row, and some row is usable. Returns the usable rows' indices and the
    drop reasons; raises ``UserFacingError`` (422 at the API) naming the field and ``where`` the rows are."""
    columns = columns_of(rows)
    missing = missing_everywhere(fmt, template, columns)
    if missing:
        if fmt == "template":
            raise UserFacingError("template_field_missing", f"template field {missing[0]!r} is in no row of "
                                  f"{where} (columns: {sorted(columns)})", "template")
        raise UserFacingError("dataset_columns_missing",
                              f"format {fmt!r} needs column {missing[0]!r}, which no row of {where} has", where)
    kept, dropped = row_stats(fmt, template, rows)
    if not kept:
        raise UserFacingError("empty_dataset", f"no usable row in {where}: {dropped or 'no rows'}", where)
    return kept, dropped


AUTO_VALIDATION_MIN_ROWS = 50
AUTO_VALIDATION_FRACTION = 0.1


def held_out(n_rows: int, validation: ValidationSpec | None) -> int:
    """How many of ``n_rows`` usable rows a job holds out for validation (a separate set: none)."""
    if validation is None:
        fraction = AUTO_VALIDATION_FRACTION if n_rows >= AUTO_VALIDATION_MIN_ROWS else 0.0
    else:
        fraction = validation.fraction or 0.0
    return min(max(1, round(fraction * n_rows)), n_rows - 1) if fraction and n_rows > 1 else 0


def row_plan(fmt: Format, template: str, rows: list[dict[str, Any]], validation: ValidationSpec | None,
             examples_per_step: int, max_steps: int) -> dict[str, Any]:
    """What a job will use of its rows, as the job record's ``dataset_stats`` shows it."""
    kept, dropped = row_stats(fmt, template, rows)
    n_val = held_out(len(kept), validation)
    train = len(kept) - n_val
    return {"format": fmt, "rows_total": len(rows), "rows_used": len(kept), "rows_dropped": dropped,
            "train_rows": train, "validation_rows": n_val,
            "epochs": round(max_steps * examples_per_step / train, 3) if train else None}
