"""A job's data as trl datasets: rows from inline, hub or uploaded sources, one format, a validation split.

Output columns follow trl's dataset types: ``text`` (template, text), ``prompt``/``completion``
(loss on the completion only) or ``messages`` (loss on assistant turns only).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset

from app.core.errors import UserFacingError
from app.core.formats import Format, detect_format, held_out, missing_everywhere, row_plan, row_stats
from app.core.ids import hub_repo_id_problem, revision_problem
from app.core.paths import dataset_file
from app.core.settings import Settings

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
    return hub_rows(spec["hub"], settings)


def uploaded_ids(payload: dict[str, Any]) -> list[str]:
    """The uploaded datasets a job reads: its dataset.id and validation.dataset.id."""
    val = (payload.get("validation") or {}).get("dataset") or {}
    return [i for i in (payload["dataset"].get("id"), val.get("id")) if i is not None]


def check_links(payload: dict[str, Any], job_id: str, linked: Callable[[str, str], bool]) -> None:
    """Refuse to read an uploaded dataset the API did not link to this job after its ownership check: the
    worker reads the dataset store only through ids checked for the job's caller (``DatasetStore.used_by``)."""
    for ds_id in uploaded_ids(payload):
        if not linked(ds_id, job_id):
            raise UserFacingError("dataset_unavailable", f"dataset {ds_id} is not available to job {job_id}")


def hub_rows(hub: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """A hub dataset's rows, resolved only as a hub repo id (app/core/ids.py says why).

    ``snapshot_download`` takes the name as a repo id and nothing else: it validates it, then reads the hub or,
    with ``HF_HUB_OFFLINE=1``, only its own cache; it never looks at the working directory. ``load_dataset``
    then gets the absolute snapshot folder that call returned, so the user's string never reaches it. The
    name is checked again here because the payload comes from Redis, not from the API's schema directly."""
    from huggingface_hub import snapshot_download

    name, revision = str(hub["name"]), hub.get("revision")
    problem = hub_repo_id_problem(name) or (revision_problem(str(revision)) if revision is not None else None)
    if problem:
        raise UserFacingError("dataset_unavailable", f"hub dataset {name!r} refused: {problem}")
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        folder = snapshot_download(repo_id=name, repo_type="dataset", revision=revision, token=token)
        return list(load_dataset(str(Path(folder).resolve()), split=hub["split"]))
    except Exception as e:  # the hub's errors are many and unrelated; the user needs the gist
        raise UserFacingError(
            "dataset_unavailable", f"could not load hub dataset {name!r} ({hub['split']}): {_gist(e)}"
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
