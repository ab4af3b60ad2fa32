"""Job routes: create, list, get, cancel, metrics and events. Thin: parse, call app/api/services/jobs.py or the
job store, shape the answer."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api.auth import Caller
from app.api.deps import Config, Datasets, Store
from app.api.errors import ApiError
from app.api.schemas import TERMINAL_STATUSES, Job, JobCreate, JobEventList, JobId, JobList, JobStatus, MetricSeries
from app.api.services import jobs as service
from app.core.store import JobStore

router = APIRouter()


@router.post("/jobs", status_code=202, response_model=Job, tags=["jobs"])
def create_job(body: JobCreate, response: Response, st: Store, ds: Datasets, cfg: Config,
               caller: Caller) -> dict[str, Any]:
    job = service.submit_job(body, caller, st, ds, cfg)
    response.headers["Location"] = f"/jobs/{job['id']}"
    return job


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
    return service.owned_job(st, job_id, caller)


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=Job, tags=["jobs"])
def cancel_job(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one stops at its next step (202 either way)."""
    return service.cancel_job(st, job_id, caller)


@router.get("/jobs/{job_id}/metrics", response_model=MetricSeries, tags=["jobs"])
def job_metrics(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    """The whole series: one point per logging step (loss, learning rate, tokens seen) or evaluation."""
    service.owned_job(st, job_id, caller)
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
    service.owned_job(st, job_id, caller)
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
