"""The HTTP API: the FastAPI app, its error handling, health routes and the routers."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app import errors
from app.dashboard import router as dashboard_router
from app.dataset_routes import router as dataset_router
from app.deps import Config, Store
from app.job_routes import router as job_router
from app.metrics import router as metrics_router
from app.openai_routes import router as openai_router
from app.schemas import ErrorEnvelope
from worker.celery_app import GENERATE_QUEUE, TRAIN_QUEUE, celery_app

log = logging.getLogger("ftaas.api")
_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorEnvelope} for s in (400, 404, 409, 422, 502, 503, 504)}

app = FastAPI(
    title="ftaas",
    version="0.1.0",
    description="Fine-tune as a service: LoRA adapters on 4-bit NF4 base models, trained and served by GPU workers.",
    responses=_ERRORS,
)
errors.install(app)


@app.exception_handler(redis.RedisError)
def _redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
    log.warning("redis unavailable: %s", exc)
    return errors.envelope(503, "store_unavailable", "the job store (Redis) is not answering; try again shortly")


@app.get("/healthz", tags=["ops"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz", tags=["ops"])
def readyz(st: Store, cfg: Config) -> JSONResponse:
    """200 when Redis answers and a worker consumes each queue; 503 naming what is missing."""
    try:
        st.ping()
    except redis.RedisError:
        return errors.envelope(503, "not_ready", "redis is not answering")
    replies = celery_app.control.inspect(timeout=cfg.readiness_timeout_s).active_queues() or {}
    served = {q["name"] for queues in replies.values() for q in queues}
    missing = [f"worker for queue {q!r}" for q in (TRAIN_QUEUE, GENERATE_QUEUE) if q not in served]
    if missing:
        return errors.envelope(503, "not_ready", "missing: " + ", ".join(missing))
    return JSONResponse({"status": "ready", "redis": "ok", "workers": sorted(replies)})


app.include_router(job_router)
app.include_router(dataset_router)
app.include_router(openai_router)
app.include_router(metrics_router)
app.include_router(dashboard_router)
