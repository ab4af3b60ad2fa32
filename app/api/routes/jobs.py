"""Job and generate routes. Thin: validate, call the job store or enqueue by task name, map the result."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api.auth import Caller
from app.api.deps import Config, Datasets, Store
from app.api.errors import ApiError
from app.api.limits import check_generate, check_job, count_generate, take_job_slot
from app.api.routes.datasets import dataset_rows, link_job
from app.api.routes.generate import stream_generate, wait_generate
from app.api.schemas import (
    TERMINAL_STATUSES,
    GenerateRequest,
    GenerateResponse,
    Job,
    JobCreate,
    JobEventList,
    JobId,
    JobList,
    JobStatus,
    MetricSeries,
)
from app.core.apikeys import Principal
from app.core.formats import detect_format, missing_everywhere, row_plan
from app.core.queue import TRAIN_QUEUE, TRAIN_TASK, celery_app
from app.core.store import JobStore, new_job_id

log = logging.getLogger("ftaas.api")
router = APIRouter()


_JOB_ID = re.compile(r"job_[0-9a-f]{22}")


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job with id {job_id!r}", "id")


def _get_job(st: JobStore, job_id: str, caller: Principal) -> dict[str, Any]:
    """The job, or 404 when there is none or another tenant owns it (the two answers are the same)."""
    job = st.get(job_id) if _JOB_ID.fullmatch(job_id) else None  # never a key of another kind
    if job is None or not caller.owns(job.get("tenant")):
        raise _not_found(job_id)
    return job


@router.post("/jobs", status_code=202, response_model=Job, tags=["jobs"])
def create_job(body: JobCreate, response: Response, st: Store, ds: Datasets, cfg: Config,
               caller: Caller) -> dict[str, Any]:
    check_job(body, cfg)
    base_model = body.base_model or cfg.default_base_model
    if base_model not in cfg.known_models:
        raise ApiError(422, "unknown_base_model",
                       f"unknown base model {base_model!r}; known: {', '.join(cfg.known_models)}", "base_model")
    payload = body.model_dump()
    payload["base_model"] = base_model
    payload["template_given"] = "template" in body.model_fields_set
    if payload["hyperparameters"]["seed"] is None:
        payload["hyperparameters"]["seed"] = int(time.time_ns() % (2**31 - 1))
    stats = None
    if body.dataset.rows is not None:
        stats = _check_rows(payload, payload["dataset"]["rows"], "dataset.rows")
    elif body.dataset.id is not None:
        stats = _check_rows(payload, dataset_rows(ds, cfg, body.dataset.id, caller=caller),
                            f"dataset {body.dataset.id}")
    validation = body.validation.dataset if body.validation else None
    if validation is not None and validation.hub is None:  # a separate set: its rows must be usable too
        rows = payload["validation"]["dataset"]["rows"] if validation.rows is not None else dataset_rows(
            ds, cfg, str(validation.id), "validation.dataset.id", caller=caller)
        _check_rows(payload, rows, "validation.dataset")
    public = {k: v for k, v in payload.items() if k != "template_given"} | {
        "dataset": _dataset_summary(payload["dataset"])}
    if public.get("validation") and public["validation"].get("dataset"):
        public["validation"] = {"dataset": _dataset_summary(public["validation"]["dataset"])}

    job_id = new_job_id()
    take_job_slot(st, caller, job_id, cfg)
    st.create(job_id, payload, public, payload["hyperparameters"]["max_steps"], stats, tenant=caller.tenant)
    link_job(ds, st, body, job_id)
    try:
        celery_app.send_task(TRAIN_TASK, args=[job_id], queue=TRAIN_QUEUE)
    except Exception as e:
        log.exception("enqueue failed for %s", job_id)
        st.fail(job_id, "queue_unavailable", "the job could not be queued")
        raise ApiError(503, "queue_unavailable", "the task queue is not answering; the job was not queued") from e
    response.headers["Location"] = f"/jobs/{job_id}"
    return _get_job(st, job_id, caller)


def _check_rows(payload: dict[str, Any], rows: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """Before queueing: the format, the columns it needs, and which rows are usable (422 if none)."""
    columns: set[str] = set().union(*(r.keys() for r in rows))
    fmt = detect_format(payload["format"], payload["template_given"], columns)
    missing = missing_everywhere(fmt, payload["template"], columns)
    if missing:
        if fmt == "template":
            raise ApiError(422, "template_field_missing",
                           f"template field {missing[0]!r} is in no row of {where} (columns: {sorted(columns)})",
                           "template")
        raise ApiError(422, "dataset_columns_missing",
                       f"format {fmt!r} needs column {missing[0]!r}, which no row of {where} has", where)
    hp = payload["hyperparameters"]
    plan = row_plan(fmt, payload["template"], rows, payload["validation"],
                    hp["batch_size"] * hp["gradient_accumulation_steps"], hp["max_steps"])
    if not plan["rows_used"]:
        raise ApiError(422, "empty_dataset", f"no usable row in {where}: {plan['rows_dropped']}", where)
    return plan


def _dataset_summary(dataset: dict[str, Any]) -> dict[str, Any]:
    if dataset.get("rows") is not None:
        return {"rows": {"count": len(dataset["rows"])}}
    return {k: v for k, v in dataset.items() if v is not None}


@router.get("/jobs", response_model=JobList, tags=["jobs"])
def list_jobs(
    st: Store,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    after: Annotated[JobId | None, Query(description="The `next_after` of the previous page.")] = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
) -> dict[str, Any]:
    jobs, has_more = st.page(limit, after, status, caller.scope)
    return {"data": jobs, "has_more": has_more, "next_after": jobs[-1]["id"] if has_more and jobs else None}


@router.get("/jobs/{job_id}", response_model=Job, tags=["jobs"])
def get_job(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    return _get_job(st, job_id, caller)


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=Job, tags=["jobs"])
def cancel_job(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one stops at its next step (202 either way)."""
    _get_job(st, job_id, caller)
    accepted, status = st.request_cancel(job_id)
    if status is None:
        raise _not_found(job_id)
    if not accepted:
        raise ApiError(409, "job_finished", f"job {job_id} already ended with status {status!r}")
    return _get_job(st, job_id, caller)


@router.post("/generate", response_model=GenerateResponse, tags=["generate"],
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}})
def generate(body: GenerateRequest, st: Store, cfg: Config, caller: Caller) -> Any:
    t0 = time.monotonic()
    count_generate(st, caller, cfg)  # every attempt counts, a rejected one too
    check_generate(body, cfg)
    if body.adapter:
        job = st.get(body.adapter)
        if job is None or not caller.owns(job.get("tenant")):
            raise ApiError(404, "adapter_not_found", f"no adapter {body.adapter!r}", "adapter")
        if job["status"] != "succeeded":
            raise ApiError(409, "adapter_not_ready",
                           f"job {body.adapter} is {job['status']}; adapters exist once a job succeeds", "adapter")
        base_model, quantization = job["request"]["base_model"], job["request"]["hyperparameters"]["quantization"]
        if body.base_model and body.base_model != base_model:
            raise ApiError(422, "base_model_mismatch",
                           f"adapter {body.adapter} was trained on {base_model!r}", "base_model")
    else:
        base_model, quantization = body.base_model or cfg.default_base_model, "nf4"
        if base_model not in cfg.known_models:
            raise ApiError(422, "unknown_base_model",
                           f"unknown base model {base_model!r}; known: {', '.join(cfg.known_models)}", "base_model")
    task_req = body.model_dump(exclude={"prompt", "prompts", "stream"}) | {
        "prompts": body.prompt_list, "base_model": base_model, "quantization": quantization}
    if body.stream:  # server-sent events (app/api/routes/generate.py)
        return stream_generate(task_req, t0, cfg)
    return wait_generate(task_req, t0, cfg)


@router.get("/jobs/{job_id}/metrics", response_model=MetricSeries, tags=["jobs"])
def job_metrics(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    """The whole series: one point per logging step (loss, learning rate, tokens seen) or evaluation."""
    _get_job(st, job_id, caller)
    return {"data": st.metric_series(job_id)}


@router.get("/jobs/{job_id}/events", response_model=JobEventList, tags=["jobs"],
         responses={200: {"content": {"text/event-stream": {}}, "description": "JSON page, or a live SSE stream"}})
def job_events(
    job_id: str,
    request: Request,
    st: Store,
    caller: Caller,
    after: Annotated[str | None, Query(pattern=r"^\d+-\d+$", description="Last event id seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    """The job's event log, oldest first. With ``Accept: text/event-stream``: a live stream that ends
    when the job ends, resumable with ``Last-Event-ID``."""
    _get_job(st, job_id, caller)
    if "text/event-stream" in request.headers.get("accept", ""):
        last = request.headers.get("last-event-id") or after
        if last is not None and not re.fullmatch(r"\d+-\d+", last):
            raise ApiError(422, "invalid_request", "Last-Event-ID must be an event id like 1700000000000-0",
                           "Last-Event-ID")
        return StreamingResponse(_event_stream(st, job_id, last), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    events = st.events(job_id, after, limit + 1)
    page = events[:limit]
    return {"data": page, "has_more": len(events) > limit,
            "next_after": page[-1]["id"] if len(events) > limit else None}


def _event_stream(st: JobStore, job_id: str, last: str | None) -> Iterator[str]:
    """SSE frames until the job has ended and its last event is sent; a comment every idle second
    keeps proxies from closing the connection. The job's final event is written atomically with
    its final status, so reading status after an empty poll cannot miss it."""
    while True:
        events = st.events(job_id, last, 100, block_ms=1000)
        for ev in events:
            last = ev["id"]
            yield f"id: {ev['id']}\nevent: {ev['type']}\ndata: {json.dumps(ev)}\n\n"
        if not events:
            job = st.get(job_id)
            if job is None or job["status"] in TERMINAL_STATUSES:
                if not st.events(job_id, last, 1):
                    return
            else:
                yield ": keep-alive\n\n"
