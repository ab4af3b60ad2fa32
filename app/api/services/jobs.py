"""Jobs: submit (check, record, link its datasets, enqueue), the caller's job, cancel.

``POST /jobs`` and ``POST /v1/fine_tuning/jobs`` both submit through ``submit_job``, so a job is checked and
queued the same way whichever surface made it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from app.api.errors import ApiError
from app.api.limits import check_job, take_job_slot
from app.api.schemas import JobCreate
from app.api.services.datasets import link_job, rows_of
from app.core.apikeys import Principal
from app.core.formats import check_rows, columns_of, detect_format, row_plan
from app.core.ids import is_job_id, new_job_id
from app.core.jobs import JobSpec
from app.core.queue import enqueue_train
from app.core.settings import Settings
from app.core.store import DatasetStore, JobStore

log = logging.getLogger("ftaas.api")


def not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job with id {job_id!r}", "id")


def owned_job(st: JobStore, job_id: str, caller: Principal) -> dict[str, Any]:
    """The job, or 404 when there is none or another tenant owns it (the two answers are the same)."""
    job = st.get(job_id) if is_job_id(job_id) else None  # never a key of another kind
    if job is None or not caller.owns(job.get("tenant")):
        raise not_found(job_id)
    return job


def known_base_model(name: str, cfg: Settings) -> str:
    """``name`` when this server may load it; 422 ``unknown_base_model`` otherwise."""
    if name not in cfg.known_models:
        raise ApiError(422, "unknown_base_model",
                       f"unknown base model {name!r}; known: {', '.join(cfg.known_models)}", "base_model")
    return name


def submit_job(body: JobCreate, caller: Principal, st: JobStore, ds: DatasetStore, cfg: Settings) -> dict[str, Any]:
    """Check a job request against this server's limits and its rows, record its spec and queue it; the job
    record. 404 for a dataset id the caller does not own, 422 for rows it cannot train on, 429 over the cap."""
    check_job(body, cfg)
    base_model = known_base_model(body.base_model or cfg.default_base_model, cfg)
    spec = JobSpec.from_request(body, base_model, default_seed=int(time.time_ns() % (2**31 - 1)))
    stats = None
    if spec.dataset.rows is not None:
        stats = _plan(spec, spec.dataset.plain_rows(), "dataset.rows")
    elif spec.dataset.id is not None:
        stats = _plan(spec, rows_of(ds, cfg, spec.dataset.id, caller), f"dataset {spec.dataset.id}")
    validation = spec.validation.dataset if spec.validation else None
    if validation is not None and validation.hub is None:  # a separate set: its rows must be usable too
        rows = validation.plain_rows() if validation.rows is not None else rows_of(
            ds, cfg, str(validation.id), caller, "validation.dataset.id")
        _plan(spec, rows, "validation.dataset")

    job_id = new_job_id()
    take_job_slot(st, caller, job_id, cfg)
    st.create(job_id, spec.model_dump(mode="json"), spec.public(), spec.hyperparameters.max_steps, stats,
              tenant=caller.tenant)
    link_job(ds, st, spec.uploads(), job_id)
    try:
        enqueue_train(job_id)
    except Exception as e:
        log.exception("enqueue failed for %s", job_id)
        st.fail(job_id, "queue_unavailable", "the job could not be queued")
        raise ApiError(503, "queue_unavailable", "the task queue is not answering; the job was not queued") from e
    return owned_job(st, job_id, caller)


def _plan(spec: JobSpec, rows: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """Before queueing: the rows' format and usable rows (app/core/formats.py's one check), as ``dataset_stats``."""
    fmt = detect_format(spec.format, spec.template_given, columns_of(rows))
    check_rows(fmt, spec.template, rows, where)
    hp = spec.hyperparameters
    return row_plan(fmt, spec.template, rows, spec.validation, hp.examples_per_step, hp.max_steps)


def cancel_job(st: JobStore, job_id: str, caller: Principal) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one stops at its next step. The job record after."""
    owned_job(st, job_id, caller)
    accepted, status = st.request_cancel(job_id)
    if status is None:
        raise not_found(job_id)
    if not accepted:
        raise ApiError(409, "job_finished", f"job {job_id} already ended with status {status!r}")
    return owned_job(st, job_id, caller)
