"""``POST /generate`` (JSON, or server-sent events with ``"stream": true``) and ``GET /adapters``; the work is
in app/api/services/generate.py."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api.auth import Caller
from app.api.deps import Config, Generations, Store
from app.api.schemas import AdapterList, GenerateRequest, GenerateResponse
from app.api.services import generate as service

router = APIRouter()


@router.post("/generate", response_model=GenerateResponse, tags=["generate"],
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}})
def generate(body: GenerateRequest, st: Store, gens: Generations, cfg: Config, caller: Caller) -> Any:
    t0 = time.monotonic()
    task = service.accept_generate(body, caller, st, cfg)
    if task.stream:
        return StreamingResponse(service.stream_generate(task, gens, t0, cfg), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return service.wait_generate(task, gens, t0, cfg)


@router.get("/adapters", response_model=AdapterList, tags=["generate"])
def loaded_adapters(gens: Generations, st: Store, caller: Caller) -> dict[str, Any]:
    """What each running generate worker has loaded: its base models and, per base, the caller's adapters
    (least recently used first) and how many it keeps at most. Reported by the workers every few seconds."""
    return {"data": service.loaded_adapters(gens, st, caller)}
