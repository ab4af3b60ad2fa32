"""Generation: accept a request (rate, limits, which adapter and base), run it and wait, or relay its stream;
and what the generate workers have loaded.

A request is one generate task plus a stream id: the worker appends each new piece of text to that Redis
stream (app.core.store.GenerationStore) when pieces are asked for, and ends it with the result or an error.
The API reads that stream, never Celery's result, whether it waits for the answer or relays it as
server-sent events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from app.api.errors import ApiError, error_body, user_error
from app.api.limits import check_generate, count_generate
from app.api.schemas import GenerateRequest
from app.api.services.jobs import known_base_model
from app.api.services.metrics import observe_generate
from app.core.apikeys import Principal
from app.core.errors import UserFacingError
from app.core.ids import new_id
from app.core.jobs import GenerateTask
from app.core.queue import enqueue_generate
from app.core.settings import Settings
from app.core.store import GenerationStore, JobStore

_GENERATE_FAILED = "generation failed on the worker; see the worker log"


def resolve_model(body: GenerateRequest, caller: Principal, st: JobStore, cfg: Settings) -> tuple[str, str]:
    """(base model, quantization) a request runs on: its adapter's (which the caller must own and which
    must have succeeded), or the named or default base model in NF4."""
    if not body.adapter:
        return known_base_model(body.base_model or cfg.default_base_model, cfg), "nf4"
    job = st.get(body.adapter)
    if job is None or not caller.owns(job.get("tenant")):
        raise ApiError(404, "adapter_not_found", f"no adapter {body.adapter!r}", "adapter")
    if job["status"] != "succeeded":
        raise ApiError(409, "adapter_not_ready",
                       f"job {body.adapter} is {job['status']}; adapters exist once a job succeeds", "adapter")
    base_model, quantization = job["request"]["base_model"], job["request"]["hyperparameters"]["quantization"]
    if body.base_model and body.base_model != base_model:
        raise ApiError(422, "base_model_mismatch", f"adapter {body.adapter} was trained on {base_model!r}",
                       "base_model")
    return base_model, quantization


def accept_generate(body: GenerateRequest, caller: Principal, st: JobStore, cfg: Settings) -> GenerateTask:
    """Count the attempt (a rejected one too), check the limits and resolve the model: the task to send
    (``stream`` as the request asks)."""
    count_generate(st, caller, cfg)
    check_generate(body, cfg)
    base_model, quantization = resolve_model(body, caller, st, cfg)
    return GenerateTask.model_validate(body.model_dump(exclude={"prompt", "prompts"}) | {
        "prompts": body.prompt_list, "base_model": base_model, "quantization": quantization,
        "gen_id": new_id("gen"), "enqueued_at": time.time()})


def _finished(data: dict[str, Any], t0: float) -> dict[str, Any]:
    """A ``done`` event's result with the total time as the API saw it, counted for /metrics."""
    data["timing"]["total_ms"] = round((time.monotonic() - t0) * 1000, 1)
    observe_generate(data["timing"]["total_ms"] / 1000, data["outputs"])
    return data


def wait_generate(task: GenerateTask, gens: GenerationStore, t0: float, cfg: Settings) -> dict[str, Any]:
    """Enqueue a generate task (not streamed) and wait for its ``done`` or ``error`` event on its Redis stream.
    A blocking XREAD wakes as soon as the worker writes: no result-backend store, publish and delete round trips
    (bench/serve_overhead.py)."""
    gen_id = task.gen_id
    sent = enqueue_generate(task.model_copy(update={"stream": False}))
    deadline = time.monotonic() + cfg.generate_timeout_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            # blocks of at most a second: the client's socket timeout (5 s) must never cut a wait
            for _, kind, data in gens.read(gen_id, "0-0", block_ms=max(1, int(min(left, 1.0) * 1000))):
                if kind == "done":
                    return _finished(data, t0)
                if kind == "error":
                    message = _GENERATE_FAILED if data["code"] == "generate_failed" else data["message"]
                    raise user_error(UserFacingError(data["code"], message))
    finally:
        gens.drop(gen_id)
    sent.revoke()
    raise ApiError(504, "generate_timeout",
                   f"no generate worker answered within {cfg.generate_timeout_s:g} s; try again")


def _frame(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _error_frame(code: str, message: str) -> str:
    return _frame("error", error_body(user_error(UserFacingError(code, message))))


def stream_generate(task: GenerateTask, gens: GenerationStore, t0: float, cfg: Settings) -> Iterator[str]:
    """Enqueue a streamed generate task; its events as SSE frames: ``token`` ({index, text}: the output's index,
    ``i * n + j`` for prompt i's completion j) as text is generated, then ``done`` (the whole response, as the
    JSON answer would be) or ``error``."""
    enqueue_generate(task.model_copy(update={"stream": True}))
    return _relay(gens, task.gen_id, t0, cfg.generate_timeout_s)


def _relay(gens: GenerationStore, gen_id: str, t0: float, timeout_s: float) -> Iterator[str]:
    last, idle_since = "0-0", time.monotonic()
    try:
        while True:
            events = gens.read(gen_id, last, block_ms=1000)
            for eid, kind, data in events:
                last = eid
                if kind == "done":
                    yield _frame("done", _finished(data, t0))
                    return
                if kind == "error":
                    yield _error_frame(data["code"], data["message"])
                    return
                yield _frame("token", data)
            if events:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > timeout_s:
                yield _error_frame("generate_timeout", f"no generate worker answered within {timeout_s:g} s")
                return
            else:
                yield ": keep-alive\n\n"
    finally:
        gens.drop(gen_id)


def loaded_adapters(gens: GenerationStore, st: JobStore, caller: Principal) -> list[dict[str, Any]]:
    """What each running generate worker has loaded: its base models and, per base, the caller's adapters
    (least recently used first) and how many it keeps at most. Reported by the workers every few seconds."""
    data = []
    for worker, report in gens.serving().items():
        for base in report.get("bases", []):
            mine = [a for a in base["adapters"] if caller.owns((st.get(a) or {}).get("tenant"))]
            data.append({"worker": worker, **base, "adapters": mine})
    return data
