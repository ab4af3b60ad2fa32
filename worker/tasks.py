"""Celery tasks: the only module binding the plain trainer and engine to Celery.

Heavy imports (torch, transformers) happen inside task bodies, in the forked child (see celery_app).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from app.jobstore import JobStore
from app.settings import get_settings
from worker.celery_app import GENERATE_TASK, TRAIN_TASK, celery_app
from worker.errors import UserFacingError

log = logging.getLogger("ftaas.tasks")
_engine: Any = None
_store: JobStore | None = None


class _StoreReporter:
    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id

    def progress(self, step: int, total_steps: int, eta_seconds: float | None, metrics: dict[str, float],
                 point: dict[str, Any]) -> None:
        self.store.report_progress(self.job_id, step, total_steps, eta_seconds, metrics, point)

    def evaluated(self, point: dict[str, Any]) -> None:
        self.store.add_event(self.job_id, "eval", point, metric=point)

    def event(self, kind: str, data: dict[str, Any], record: dict[str, Any] | None = None) -> None:
        self.store.add_event(self.job_id, kind, data, **(record or {}))

    def should_stop(self) -> bool:
        return self.store.cancel_requested(self.job_id)


@celery_app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> str:
    settings = get_settings()
    store = JobStore.from_url(settings.redis_url, settings.redis_prefix)
    if not store.start(job_id):  # cancelled while queued, or already handled
        log.info("job %s not started: no longer queued", job_id)
        return "skipped"
    try:
        from worker.trainer import train

        payload = store.payload(job_id)
        if payload is None:
            raise UserFacingError("internal_error", "the job's request is missing from the store")
        out = settings.adapter_dir / job_id
        out.parent.mkdir(parents=True, exist_ok=True)
        outcome = train(payload, out, _StoreReporter(store, job_id), settings)
    except UserFacingError as e:
        log.warning("job %s failed: %s", job_id, e.message)
        store.fail(job_id, e.code, e.message)
        return "failed"
    except Exception as e:
        log.exception("job %s failed", job_id)
        message = "out of memory: try a smaller batch_size or max_length" if "out of memory" in str(e) else (
            f"training failed: {type(e).__name__}: {str(e)[:300]}")
        store.fail(job_id, "out_of_memory" if "out of memory" in str(e) else "training_error", message)
        return "failed"
    if outcome.cancelled or store.cancel_requested(job_id):
        store.transition(job_id, "cancelled")
        return "cancelled"
    store.transition(job_id, "succeeded", adapter=job_id, evaluation=outcome.evaluation)
    return "succeeded"


@celery_app.task(name=GENERATE_TASK)
def generate(request: dict[str, Any], enqueued_at: float) -> dict[str, Any]:
    """Returns ``{"result": ...}`` or ``{"error": {"code", "message"}}``; never raises for user errors."""
    global _engine, _store
    queue_ms = (time.time() - enqueued_at) * 1000
    try:
        if _engine is None:
            from worker.inference import Engine

            _engine = Engine(get_settings())
        result = _engine.generate(request)
    except UserFacingError as e:
        return {"error": {"code": e.code, "message": e.message}}
    result["timing"]["queue_ms"] = round(queue_ms, 1)
    cache = result.pop("adapter_cache", None)
    if cache:  # counted for /metrics; a failed count never fails the generation
        try:
            _store = _store or JobStore.from_url(get_settings().redis_url, get_settings().redis_prefix)
            _store.incr_stat("adapter_hits" if cache == "hit" else "adapter_loads")
        except Exception:
            log.warning("could not count adapter cache %s", cache, exc_info=True)
    return {"result": result}
