"""Streaming generation (``"stream": true`` on ``/generate``) and ``GET /adapters``.

A streamed request is one generate task like any other plus a stream id: the worker appends each new
piece of text to that Redis stream (app.core.store.GenerationStore) and ends it with the result or an
error; this module relays the stream as server-sent events. The API never waits on Celery's result for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from app.api.auth import Caller
from app.api.deps import Store, job_store
from app.api.errors import ApiError
from app.api.routes.ops import observe_generate
from app.api.schemas import AdapterList
from app.core.queue import GENERATE_QUEUE, GENERATE_TASK, celery_app
from app.core.settings import Settings, get_settings
from app.core.store import GenerationStore, new_id

router = APIRouter()


@lru_cache
def generation_store() -> GenerationStore:
    return GenerationStore(job_store().r, get_settings().redis_prefix)


Generations = Annotated[GenerationStore, Depends(generation_store)]


def _frame(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def stream_generate(task_req: dict[str, Any], t0: float, cfg: Settings) -> StreamingResponse:
    """Enqueue a streamed generate task and answer its events as SSE: ``token`` ({index, text}) as text
    is generated, then ``done`` (the whole response, as the JSON answer would be) or ``error``."""
    gens = generation_store()
    gen_id = new_id("gen")
    celery_app.send_task(GENERATE_TASK, args=[task_req, time.time(), gen_id], queue=GENERATE_QUEUE,
                         ignore_result=True)
    return StreamingResponse(_relay(gens, gen_id, t0, cfg.generate_timeout_s), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def wait_generate(task_req: dict[str, Any], t0: float, cfg: Settings) -> dict[str, Any]:
    """Enqueue a generate task and wait for its ``done`` or ``error`` event on its Redis stream (no pieces are
    sent for it). A blocking XREAD wakes as soon as the worker writes: no result-backend store, publish and
    delete round trips (bench/serve_overhead.py)."""
    gens = generation_store()
    gen_id = new_id("gen")
    sent = celery_app.send_task(GENERATE_TASK, args=[task_req, time.time(), gen_id, False], queue=GENERATE_QUEUE,
                                ignore_result=True)
    deadline = time.monotonic() + cfg.generate_timeout_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            # blocks of at most a second: the client's socket timeout (5 s) must never cut a wait
            for _, kind, data in gens.read(gen_id, "0-0", block_ms=max(1, int(min(left, 1.0) * 1000))):
                if kind == "done":
                    data["timing"]["total_ms"] = round((time.monotonic() - t0) * 1000, 1)
                    observe_generate(data["timing"]["total_ms"] / 1000, data["outputs"])
                    return data  # type: ignore[no-any-return]
                if kind == "error":
                    if data["code"] == "generate_failed":
                        raise ApiError(502, "generate_failed", "generation failed on the worker; see the worker log")
                    raise ApiError(404 if data["code"] == "adapter_not_found" else 422, data["code"], data["message"])
    finally:
        gens.drop(gen_id)
    sent.revoke()
    raise ApiError(504, "generate_timeout",
                   f"no generate worker answered within {cfg.generate_timeout_s:g} s; try again")


def _relay(gens: GenerationStore, gen_id: str, t0: float, timeout_s: float) -> Iterator[str]:
    last, idle_since = "0-0", time.monotonic()
    try:
        while True:
            events = gens.read(gen_id, last, block_ms=1000)
            for eid, kind, data in events:
                last = eid
                if kind == "done":
                    data["timing"]["total_ms"] = round((time.monotonic() - t0) * 1000, 1)
                    observe_generate(data["timing"]["total_ms"] / 1000, data["outputs"])
                    yield _frame("done", data)
                    return
                if kind == "error":
                    yield _frame("error", {"error": {**data, "field": None}})
                    return
                yield _frame("token", data)
            if events:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > timeout_s:
                yield _frame("error", {"error": {"code": "generate_timeout", "field": None, "message":
                                                 f"no generate worker answered within {timeout_s:g} s"}})
                return
            else:
                yield ": keep-alive\n\n"
    finally:
        gens.drop(gen_id)


@router.get("/adapters", response_model=AdapterList, tags=["generate"])
def loaded_adapters(gens: Generations, st: Store, caller: Caller) -> dict[str, Any]:
    """What each running generate worker has loaded: its base models and, per base, the caller's adapters
    (least recently used first) and how many it keeps at most. Reported by the workers every few seconds."""
    data = []
    for worker, report in gens.serving().items():
        for base in report.get("bases", []):
            mine = [a for a in base["adapters"] if caller.owns((st.get(a) or {}).get("tenant"))]
            data.append({"worker": worker, **base, "adapters": mine})
    return {"data": data}
