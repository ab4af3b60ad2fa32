"""The HTTP API: the FastAPI app, its error handling, health routes and the routers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from app.api import auth, errors
from app.api.deps import Config, Store, job_store
from app.api.limits import BodyLimit
from app.api.openai.routes import router as openai_router
from app.api.routes.dashboard import router as dashboard_router
from app.api.routes.datasets import router as dataset_router
from app.api.routes.generate import router as generate_router
from app.api.routes.jobs import router as job_router
from app.api.routes.ops import router as metrics_router
from app.api.schemas import ErrorEnvelope
from app.core.lease import Reaper
from app.core.queue import GENERATE_QUEUE, TRAIN_QUEUE, celery_app, enqueue_train
from app.core.settings import get_settings

log = logging.getLogger("ftaas.api")
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorEnvelope} for s in (400, 401, 403, 404, 409, 413, 422, 429, 502, 503, 504)}


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    auth.startup_check(get_settings())  # logs the auth mode; refuses to run open on a public address
    # lost jobs are requeued even while no train worker is up (app/core/lease.py; workers sweep too)
    reaper = Reaper(job_store(), get_settings(), enqueue_train)
    reaper.thread()
    yield
    reaper.stopped.set()


app = FastAPI(
    title="ftaas",
    version="0.1.0",
    description="Fine-tune as a service: LoRA adapters on 4-bit NF4 base models, trained and served by GPU workers.",
    responses=_ERRORS,
    lifespan=_lifespan,
)
errors.install(app)
app.add_middleware(BodyLimit)


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
    return JSONResponse({"status": "ready", "redis": "ok", "workers": sorted(replies),
                         "auth": "open" if auth.key_table().open else "api_key"})


# Every data route needs a key once keys are configured (app/api/auth.py); /metrics an admin key.
_keyed = [Depends(auth.principal)]
app.include_router(job_router, dependencies=_keyed)
app.include_router(generate_router, dependencies=_keyed)
app.include_router(dataset_router, dependencies=_keyed)
app.include_router(openai_router, dependencies=_keyed)
app.include_router(metrics_router, dependencies=[Depends(auth.admin)])
app.include_router(dashboard_router)
