"""Training text from a job's dataset: inline rows or a hub dataset, rendered with the template."""

from __future__ import annotations

from typing import Any

from datasets import Dataset, load_dataset

from app.schemas import template_fields
from app.settings import Settings
from worker.errors import UserFacingError


def missing_fields(template: str, columns: set[str]) -> list[str]:
    return [f for f in template_fields(template) if f not in columns]


def render(template: str, row: dict[str, Any]) -> str:
    return template.format_map({k: "" if v is None else v for k, v in row.items()})


def training_texts(payload: dict[str, Any], settings: Settings) -> Dataset:
    """A ``text`` column, one rendered example per usable row."""
    spec, template = payload["dataset"], payload["template"]
    if spec.get("rows") is not None:
        rows: list[dict[str, Any]] = spec["rows"]
        columns = set().union(*(r.keys() for r in rows))
        source = Dataset.from_list(rows)
    else:
        hub = spec["hub"]
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        try:
            source = load_dataset(hub["name"], split=hub["split"], revision=hub.get("revision"), token=token)
        except Exception as e:  # the hub's errors are many and unrelated; the user needs the gist
            raise UserFacingError(
                "dataset_unavailable", f"could not load hub dataset {hub['name']!r} ({hub['split']}): {_gist(e)}"
            ) from e
        columns = set(source.column_names)
    missing = missing_fields(template, columns)
    if missing:
        raise UserFacingError(
            "template_field_missing",
            f"template names {', '.join(repr(m) for m in missing)} but the dataset has only {sorted(columns)}",
        )
    texts = [render(template, r) for r in source]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserFacingError("empty_dataset", "no row renders to non-empty text with this template")
    return Dataset.from_dict({"text": texts})


def _gist(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]
