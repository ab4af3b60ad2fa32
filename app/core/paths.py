"""Where stored files live. Plain Python: the workers import it without the web framework."""

from pathlib import Path

from app.core.ids import is_dataset_id
from app.core.settings import Settings

__all__ = ["dataset_file", "is_dataset_id"]


def dataset_file(settings: Settings, ds_id: str) -> Path:
    """Where an uploaded dataset's rows are, as JSONL: read by the worker, written by the API."""
    if not is_dataset_id(ds_id):
        raise ValueError(f"not a dataset id: {ds_id!r}")
    return settings.dataset_dir / f"{ds_id}.jsonl"
