"""Where stored files live, the one home for every path under ``FTAAS_DATA_DIR``. Plain Python: the API writes
uploads, the workers read them and write adapters and checkpoints. Every name is a generated id checked here, so
no string a caller sends is ever part of a path (docs/threat-model.md)."""

from pathlib import Path

from app.core.ids import is_dataset_id, is_job_id
from app.core.settings import Settings

__all__ = ["adapter_dir", "checkpoint_dir", "dataset_file", "dataset_staging", "is_dataset_id"]


def _job(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


def _dataset(ds_id: str) -> str:
    if not is_dataset_id(ds_id):
        raise ValueError(f"not a dataset id: {ds_id!r}")
    return ds_id


def dataset_file(settings: Settings, ds_id: str) -> Path:
    """Where an uploaded dataset's rows are, as JSONL: read by the worker, written by the API."""
    return settings.dataset_dir / f"{_dataset(ds_id)}.jsonl"


def dataset_staging(settings: Settings, ds_id: str) -> tuple[Path, Path]:
    """An upload's two temporary files beside the store (the bytes as received, then the checked JSONL): hidden
    names, renamed to ``dataset_file`` only once the upload is accepted."""
    name = _dataset(ds_id)
    return settings.dataset_dir / f".{name}.upload", settings.dataset_dir / f".{name}.partial"


def adapter_dir(settings: Settings, job_id: str) -> Path:
    """A succeeded job's LoRA adapter (peft's ``save_pretrained`` layout), named by the job id."""
    return settings.adapter_dir / _job(job_id)


def checkpoint_dir(settings: Settings, job_id: str) -> Path:
    """``<dir>/<job id>/checkpoint-<step>``: kept while the job may resume, deleted when it ends."""
    return settings.checkpoint_dir / _job(job_id)
