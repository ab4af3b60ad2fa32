"""A job's data as trl datasets: rows from inline, hub or uploaded sources, one format, a validation split.

Output columns follow trl's dataset types: ``text`` (template, text), ``prompt``/``completion``
(loss on the completion only) or ``messages`` (loss on assistant turns only).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset

from app.core.errors import UserFacingError
from app.core.formats import Format, check_rows, columns_of, detect_format, held_out, row_plan
from app.core.ids import hub_repo_id_problem, revision_problem
from app.core.jobs import DatasetSpec, HubDataset, JobSpec
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


def load_rows(spec: DatasetSpec, settings: Settings) -> list[dict[str, Any]]:
    if spec.rows is not None:
        return spec.plain_rows()
    if spec.id is not None:
        path = dataset_file(settings, spec.id)
        if not path.is_file():
            raise UserFacingError("dataset_unavailable", f"uploaded dataset {spec.id} is gone from the store")
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    assert spec.hub is not None  # DatasetSpec holds exactly one source
    return hub_rows(spec.hub, settings)


def uploaded_ids(spec: JobSpec | Mapping[str, Any]) -> list[str]:
    """The uploaded datasets a job reads (its dataset.id and validation.dataset.id), from its spec or the
    spec's stored JSON form."""
    if isinstance(spec, JobSpec):
        return [ds_id for _, ds_id in spec.uploads()]
    val = (spec.get("validation") or {}).get("dataset") or {}
    return [i for i in (spec["dataset"].get("id"), val.get("id")) if i is not None]


def check_links(spec: JobSpec | Mapping[str, Any], job_id: str, linked: Callable[[str, str], bool]) -> None:
    """Refuse to read an uploaded dataset the API did not link to this job after its ownership check: the
    worker reads the dataset store only through ids checked for the job's caller (``DatasetStore.used_by``)."""
    for ds_id in uploaded_ids(spec):
        if not linked(ds_id, job_id):
            raise UserFacingError("dataset_unavailable", f"dataset {ds_id} is not available to job {job_id}")


def hub_rows(hub: HubDataset | Mapping[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """A hub dataset's rows, resolved only as a hub repo id (app/core/ids.py says why).

    ``snapshot_download`` takes the name as a repo id and nothing else: it validates it, then reads the hub or,
    with ``HF_HUB_OFFLINE=1``, only its own cache; it never looks at the working directory. ``load_dataset``
    then gets the absolute snapshot folder that call returned, so the user's string never reaches it. The
    name is checked again here because the payload comes from Redis, not from the API's schema directly."""
    from huggingface_hub import snapshot_download

    fields = hub.model_dump() if isinstance(hub, HubDataset) else hub
    name, revision, split = str(fields["name"]), fields.get("revision"), fields.get("split", "train")
    problem = hub_repo_id_problem(name) or (revision_problem(str(revision)) if revision is not None else None)
    if problem:
        raise UserFacingError("dataset_unavailable", f"hub dataset {name!r} refused: {problem}")
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        folder = snapshot_download(repo_id=name, repo_type="dataset", revision=revision, token=token)
        return list(load_dataset(str(Path(folder).resolve()), split=split))
    except Exception as e:  # the hub's errors are many and unrelated; the user needs the gist
        raise UserFacingError(
            "dataset_unavailable", f"could not load hub dataset {name!r} ({split}): {_gist(e)}"
        ) from e


def to_example(fmt: Format, template: str, row: dict[str, Any]) -> dict[str, Any]:
    if fmt == "template":
        return {"text": render(template, row)}
    if fmt == "text":
        return {"text": str(row["text"])}
    if fmt == "prompt_completion":
        return {"prompt": str(row["prompt"]), "completion": str(row["completion"])}
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}


def _examples(fmt: Format, template: str, rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The usable rows as training examples (app/core/formats.py's check, the same as the API's)."""
    kept, _ = check_rows(fmt, template, rows, where)
    return [to_example(fmt, template, rows[i]) for i in kept]


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


def prepare(spec: JobSpec, settings: Settings) -> PreparedData:
    template, hp = spec.template, spec.hyperparameters
    rows = load_rows(spec.dataset, settings)
    fmt = detect_format(spec.format, spec.template_given, columns_of(rows))
    examples = _examples(fmt, template, rows, "dataset")
    val_spec = spec.validation
    stats = row_plan(fmt, template, rows, val_spec, hp.examples_per_step, hp.max_steps)

    validation: list[dict[str, Any]] = []
    n_val = held_out(len(examples), val_spec)
    if n_val:
        order = list(range(len(examples)))
        random.Random(hp.seed).shuffle(order)
        held = set(order[:n_val])
        validation = [examples[i] for i in sorted(held)]
        examples = [e for i, e in enumerate(examples) if i not in held]
    elif val_spec and val_spec.dataset:
        validation = _examples(fmt, template, load_rows(val_spec.dataset, settings), "validation dataset")
        stats["validation_rows"] = len(validation)

    user_prompts = spec.sample_prompts
    prompts: list[str | list[dict[str, str]]] = list(user_prompts) if user_prompts else [
        _prompt_of(fmt, e) for e in (validation or examples)[:SAMPLE_COUNT]]
    return PreparedData(fmt, Dataset.from_list(examples), Dataset.from_list(validation) if validation else None,
                        stats, prompts)


def _gist(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]
