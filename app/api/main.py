"""The HTTP API: the FastAPI app, its lifespan, error handling and the routers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from app.api import auth, errors
from app.api.deps import job_store
from app.api.limits import BodyLimit
from app.api.openai.routes import router as openai_router
from app.api.routes.dashboard import router as dashboard_router
from app.api.routes.datasets import router as dataset_router
from app.api.routes.generate import router as generate_router
from app.api.routes.jobs import router as job_router
from app.api.routes.ops import probes
from app.api.routes.ops import router as metrics_router
from app.api.routes.webhooks import router as webhook_router
from app.api.schemas import ErrorEnvelope
from app.api.services.webhooks import webhook_store
from app.core.lease import Reaper
from app.core.queue import enqueue_train
from app.core.settings import get_settings
from app.core.webhooks import Deliverer

log = logging.getLogger("ftaas.api")
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorEnvelope} for s in (400, 401, 403, 404, 409, 413, 422, 429, 502, 503, 504)}


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    auth.startup_check(get_settings())  # logs the auth mode; refuses to run open on a public address
    # lost jobs are requeued even while no train worker is up (app/core/lease.py; workers sweep too)
    reaper = Reaper(job_store(), get_settings(), enqueue_train)
    reaper.thread()
    # webhook deliveries from the Redis outbox, off the request path (app/core/webhooks.py)
    deliverer = Deliverer(webhook_store(), get_settings())
    deliverer.thread()
    yield
    reaper.stopped.set()
    deliverer.stop()


app = FastAPI(
    title="ftaas",
    version="0.1.0",
    description="Fine-tune as a service: LoRA adapters on 4-bit NF4 base models, trained and served by GPU workers.",
    responses=_ERRORS,
    lifespan=_lifespan,
)
errors.install(app)
app.add_middleware(BodyLimit)

app.include_router(probes)
# Every data route needs a key once keys are configured (app/api/auth.py); /metrics an admin key.
_keyed = [Depends(auth.principal)]
app.include_router(job_router, dependencies=_keyed)
app.include_router(generate_router, dependencies=_keyed)
app.include_router(dataset_router, dependencies=_keyed)
app.include_router(webhook_router, dependencies=_keyed)
app.include_router(openai_router, dependencies=_keyed)
app.include_router(metrics_router, dependencies=[Depends(auth.admin)])
app.include_router(dashboard_router)
