"""A job's data as trl datasets: rows from inline, hub or uploaded sources, one format, a validation split.

Output columns follow trl's dataset types: ``text`` (template, text), ``prompt``/``completion``
(loss on the completion only) or ``messages`` (loss on assistant turns only).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, load_dataset

from app.formats import Format, detect_format, held_out, missing_everywhere, row_plan, row_stats
from app.settings import Settings
from app.storage import dataset_file
from worker.errors import UserFacingError

SAMPLE_COUNT = 3


@dataclass
class PreparedData:
    format: Format
    train: Dataset
    validation: Dataset | None
    stats: dict[str, Any]
    #: prompts for before/after samples: strings, or chat messages to render with the chat template
    sample_prompts: list[str | list[dict[str, str]]] = field(default_factory=list)


def render(template: str, row: dict[str, Any]) -> str:
    return template.format_map({k: "" if v is None else v for k, v in row.items()})


def load_rows(spec: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    if spec.get("rows") is not None:
        return list(spec["rows"])
    if spec.get("id") is not None:
        path = dataset_file(settings, spec["id"])
        if not path.is_file():
            raise UserFacingError("dataset_unavailable", f"uploaded dataset {spec['id']} is gone from the store")
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    hub = spec["hub"]
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        return list(load_dataset(hub["name"], split=hub["split"], revision=hub.get("revision"), token=token))
    except Exception as e:  # the hub's errors are many and unrelated; the user needs the gist
        raise UserFacingError(
            "dataset_unavailable", f"could not load hub dataset {hub['name']!r} ({hub['split']}): {_gist(e)}"
        ) from e


def to_example(fmt: Format, template: str, row: dict[str, Any]) -> dict[str, Any]:
    if fmt == "template":
        return {"text": render(template, row)}
    if fmt == "text":
        return {"text": str(row["text"])}
    if fmt == "prompt_completion":
        return {"prompt": str(row["prompt"]), "completion": str(row["completion"])}
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}


def _usable(fmt: Format, template: str, rows: list[dict[str, Any]],
            what: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    missing = missing_everywhere(fmt, template, columns)
    if missing:
        names = ", ".join(repr(m) for m in missing)
        raise UserFacingError("template_field_missing" if fmt == "template" else "dataset_columns_missing",
                              f"{what} needs {names} for format {fmt!r} but has only {sorted(columns)}")
    kept, dropped = row_stats(fmt, template, rows)
    if not kept:
        raise UserFacingError("empty_dataset", f"no usable row in the {what} ({dropped or 'no rows'})")
    return [to_example(fmt, template, rows[i]) for i in kept], dropped


def _prompt_of(fmt: Format, example: dict[str, Any]) -> str | list[dict[str, str]]:
    """The first words of an example: what the model should go on from."""
    if fmt == "prompt_completion":
        return str(example["prompt"])
    if fmt == "messages":
        msgs = example["messages"]
        first_reply = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return list(msgs[:first_reply])
    words = example["text"].split(" ")
    return " ".join(words[: max(2, min(4, len(words) - 1))])


def prepare(payload: dict[str, Any], settings: Settings) -> PreparedData:
    spec, template, hp = payload["dataset"], payload["template"], payload["hyperparameters"]
    rows = load_rows(spec, settings)
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    fmt = detect_format(payload.get("format", "auto"), payload.get("template_given", False), columns)
    examples, _ = _usable(fmt, template, rows, "dataset")
    val_spec = payload.get("validation")
    stats = row_plan(fmt, template, rows, val_spec, hp["batch_size"] * hp["gradient_accumulation_steps"],
                     hp["max_steps"])

    validation: list[dict[str, Any]] = []
    n_val = held_out(len(examples), val_spec)
    if n_val:
        order = list(range(len(examples)))
        random.Random(hp["seed"]).shuffle(order)
        held = set(order[:n_val])
        validation = [examples[i] for i in sorted(held)]
        examples = [e for i, e in enumerate(examples) if i not in held]
    elif val_spec and val_spec.get("dataset"):
        validation, _ = _usable(fmt, template, load_rows(val_spec["dataset"], settings), "validation dataset")
        stats["validation_rows"] = len(validation)

    user_prompts = payload.get("sample_prompts")
    prompts: list[str | list[dict[str, str]]] = list(user_prompts) if user_prompts else [
        _prompt_of(fmt, e) for e in (validation or examples)[:SAMPLE_COUNT]]
    return PreparedData(fmt, Dataset.from_list(examples), Dataset.from_list(validation) if validation else None,
                        stats, prompts)


def _gist(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]
