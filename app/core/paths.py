"""Where stored files live. Plain Python: the workers import it without the web framework."""

import re
from pathlib import Path

from app.core.settings import Settings

_DATASET_ID = re.compile(r"^ds_[0-9a-f]{22}$")


def is_dataset_id(value: str) -> bool:
    return bool(_DATASET_ID.match(value))


def dataset_file(settings: Settings, ds_id: str) -> Path:
    """Where an uploaded dataset's rows are, as JSONL: read by the worker, written by the API."""
    if not is_dataset_id(ds_id):
        raise ValueError(f"not a dataset id: {ds_id!r}")
    return settings.dataset_dir / f"{ds_id}.jsonl"
