"""OpenAI-compatible routes under ``/v1``, so code written with the official ``openai`` client runs on ftaas.

Every route maps onto ftaas's own objects through the same services (app/api/services) as the ftaas routes:
files are uploaded datasets (the file id is the ``ds_…`` id), fine-tuning jobs are ftaas jobs submitted by
``submit_job`` (the job id is the ``job_…`` id), and completions are the generate task. So ``/jobs`` and
``/v1/fine_tuning/jobs`` list the same jobs. Errors on these routes come in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}`` (422 becomes 400, as OpenAI answers), rendered by
app/api/errors.py from the same error as the ftaas envelope. The mappings are in app/api/openai/mapping.py.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Coroutine, Iterator
from typing import Any

from fastapi import Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute, APIRouter
from python_multipart.multipart import MultipartParser, parse_options_header

from app.api.auth import Caller
from app.api.deps import Config, Datasets, Generations, Store
from app.api.errors import ApiError, as_api_error, error_response
from app.api.openai.mapping import (
    build,
    file_object,
    fine_tuned_model,
    fine_tuning_event,
    fine_tuning_job,
    job_create,
    model_object,
    render_chat,
    usage,
)
from app.api.openai.protocol import (
    ChatCompletionCreate,
    CompletionCreate,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobCreate,
    FineTuningJobEventList,
    FineTuningJobList,
    Model,
    ModelList,
)
from app.api.schemas import DatasetId, ErrorEnvelope, GenerateRequest, JobId
from app.api.services.datasets import FILE_FIELD, delete_dataset, owned_dataset, rows_of, upload_dataset
from app.api.services.generate import accept_generate, wait_generate
from app.api.services.jobs import cancel_job, owned_job, submit_job
from app.core.apikeys import Principal
from app.core.ids import is_job_id
from app.core.settings import Settings
from app.core.store import EVENTS_MAXLEN, GenerationStore, JobStore

_EVENT_ID = r"^ftevent-\d+-\d+$"


class OpenAIRoute(APIRoute):
    """Answers any error in OpenAI's shape: the same error the app's own handlers would answer with."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_response(as_api_error(request, exc), "openai")

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


# -- files ------------------------------------------------------------------------------------------

class _PurposeSniffer:
    """Feeds the upload's body to a second multipart parser that keeps the ``purpose`` field as the chunks
    pass by; a purpose other than ``fine-tune`` stops the upload as soon as it is read."""

    def __init__(self, content_type: str) -> None:
        self.purpose: str | None = None
        self._name, self._value, self._hfield, self._hvalue = b"", b"", b"", b""
        self._broken = False
        _, options = parse_options_header(content_type)
        self._parser = MultipartParser(options.get(b"boundary", b"-"), {  # type: ignore[arg-type]
            "on_part_begin": self._begin, "on_header_field": self._hf, "on_header_value": self._hv,
            "on_header_end": self._he, "on_part_data": self._data, "on_part_end": self._end})

    def _begin(self) -> None:
        self._name, self._value = b"", b""

    def _hf(self, data: bytes, start: int, end: int) -> None:
        self._hfield += data[start:end]

    def _hv(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _he(self) -> None:
        if self._hfield.lower() == b"content-disposition":
            self._name = parse_options_header(self._hvalue)[1].get(b"name", b"")
        self._hfield, self._hvalue = b"", b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._name == b"purpose" and len(self._value) < 100:
            self._value += data[start:end]

    def _end(self) -> None:
        if self._name == b"purpose":
            self.purpose = self._value.decode("utf-8", "replace").strip()
            if self.purpose != "fine-tune":
                raise ApiError(400, "invalid_purpose", f"purpose {self.purpose!r} is not offered; use 'fine-tune'",
                               "purpose")

    async def sniff(self, chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
        async for chunk in chunks:
            try:
                if not self._broken:
                    self._parser.write(chunk)
            except ApiError:
                raise
            except Exception:  # a malformed body is the upload parser's to report
                self._broken = True
            yield chunk


_FILE_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FILE_FIELD, "purpose"],
    "properties": {FILE_FIELD: {"type": "string", "format": "binary", "description": "JSONL training data."},
                   "purpose": {"type": "string", "enum": ["fine-tune"]}},
}}}}}


@router.post("/files", response_model=FileObject, openapi_extra=_FILE_BODY,
             responses={s: {"model": ErrorEnvelope} for s in (400, 413, 415)})
async def create_file(request: Request, cfg: Config, ds: Datasets, caller: Caller) -> dict[str, Any]:
    """Upload JSONL training data (multipart ``file``, ``purpose`` = ``fine-tune``): rows of chat
    ``messages`` or ``prompt``/``completion``. Stored as an ftaas dataset; the file id is its id."""
    content_type = request.headers.get("content-type", "")
    sniffer = _PurposeSniffer(content_type)
    meta = await upload_dataset(sniffer.sniff(request.stream()), content_type,
                                request.headers.get("content-length", ""), cfg, ds, caller)
    columns = set(meta["columns"])
    problem = None if sniffer.purpose else "purpose is required ('fine-tune')"
    if problem is None and "messages" not in columns and not {"prompt", "completion"} <= columns:
        problem = f"rows need a 'messages' column or 'prompt' and 'completion' columns (found {sorted(columns)})"
    if problem:
        delete_dataset(ds, cfg, meta["id"], caller)
        raise ApiError(400, "invalid_file_format", problem, "purpose" if not sniffer.purpose else FILE_FIELD)
    return file_object(meta)


@router.get("/files", response_model=FileList)
def list_files(ds: Datasets, caller: Caller, limit: int = Query(20, ge=1, le=100),
               after: DatasetId | None = None) -> dict[str, Any]:
    items, has_more = ds.page(limit, after, caller.scope)
    return {"data": [file_object(m) for m in items], "has_more": has_more}


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, ds: Datasets, caller: Caller) -> dict[str, Any]:
    return file_object(owned_dataset(ds, file_id, caller))


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, ds: Datasets, cfg: Config, caller: Caller) -> dict[str, Any]:
    delete_dataset(ds, cfg, file_id, caller)
    return {"id": file_id, "deleted": True}


# -- fine-tuning jobs -------------------------------------------------------------------------------

def _ft_job(st: JobStore, job: dict[str, Any]) -> dict[str, Any]:
    def trained_tokens(job_id: str) -> int | None:
        seen = [p["tokens_seen"] for p in st.metric_series(job_id) if p.get("tokens_seen") is not None]
        return seen[-1] if seen else None

    return fine_tuning_job(job, trained_tokens)


@router.post("/fine_tuning/jobs", response_model=FineTuningJob)
def create_fine_tuning_job(body: FineTuningJobCreate, st: Store, ds: Datasets, cfg: Config,
                           caller: Caller) -> dict[str, Any]:
    """Create an ftaas job from the OpenAI body (checked and queued exactly as ``POST /jobs``)."""
    job = job_create(body, rows_of(ds, cfg, body.training_file, caller, "dataset.id"))
    return _ft_job(st, submit_job(job, caller, st, ds, cfg))


@router.get("/fine_tuning/jobs", response_model=FineTuningJobList)
def list_fine_tuning_jobs(
    st: Store, caller: Caller, limit: int = Query(20, ge=1, le=100), after: JobId | None = None,
) -> dict[str, Any]:
    """Newest first; ``after`` is the last id of the previous page."""
    jobs, has_more = st.page(limit, after, tenant=caller.scope)
    return {"data": [_ft_job(st, j) for j in jobs], "has_more": has_more}


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_fine_tuning_job(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    return _ft_job(st, owned_job(st, job_id, caller))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_fine_tuning_job(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    """Queued: ``cancelled`` at once. Running: still ``running`` until it stops at its next step."""
    return _ft_job(st, cancel_job(st, job_id, caller))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=FineTuningJobEventList)
def list_fine_tuning_events(
    job_id: str, st: Store, caller: Caller, limit: int = Query(20, ge=1, le=100),
    after: str | None = Query(None, pattern=_EVENT_ID, description="The last event id of the previous page."),
) -> dict[str, Any]:
    """The job's ftaas event stream as OpenAI events, newest first (the last EVENTS_MAXLEN events)."""
    owned_job(st, job_id, caller)
    events = st.events(job_id, None, EVENTS_MAXLEN)[::-1]
    if after:
        stream_id = after.removeprefix("ftevent-")
        events = [e for e in events if _older(e["id"], stream_id)]
    return {"data": [fine_tuning_event(e) for e in events[:limit]], "has_more": len(events) > limit}


def _older(a: str, b: str) -> bool:
    return tuple(map(int, a.split("-"))) < tuple(map(int, b.split("-")))


# -- models -----------------------------------------------------------------------------------------

def _resolve(st: JobStore, cfg: Settings, model: str,
             caller: Principal) -> tuple[str | None, str, dict[str, Any] | None]:
    """(adapter, base model, job) for a model id: a known base model, a fine-tuned model id or a job id."""
    if model in cfg.known_models:
        return None, model, None
    job_id = model.rsplit(":", 1)[-1]
    job = st.get(job_id) if is_job_id(job_id) else None
    if job is None or not caller.owns(job.get("tenant")) or job["status"] != "succeeded" \
            or model not in (job_id, fine_tuned_model(job)):
        raise ApiError(404, "model_not_found", f"The model {model!r} does not exist: name a base model "
                       f"({', '.join(cfg.known_models)}) or a succeeded job's fine_tuned_model", "model")
    return job_id, job["request"]["base_model"], job


@router.get("/models", response_model=ModelList)
def list_models(st: Store, cfg: Config, caller: Caller) -> dict[str, Any]:
    """Base models ftaas knows, then every succeeded job's fine-tuned model, newest first."""
    data = [{"id": m, "created": 0, "owned_by": "ftaas"} for m in cfg.known_models]
    after, more = None, True
    while more:
        jobs, more = st.page(100, after, "succeeded", caller.scope)
        data += [model_object(j) for j in jobs]
        after = jobs[-1]["id"] if jobs else None
        more = more and after is not None
    return {"data": data}


@router.get("/models/{model:path}", response_model=Model)
def retrieve_model(model: str, st: Store, cfg: Config, caller: Caller) -> dict[str, Any]:
    _, base, job = _resolve(st, cfg, model, caller)
    return model_object(job) if job else {"id": base, "created": 0, "owned_by": "ftaas"}


# -- completions ------------------------------------------------------------------------------------

def _generate(st: JobStore, gens: GenerationStore, cfg: Settings, caller: Principal,
              body: CompletionCreate | ChatCompletionCreate, prompts: list[str], max_tokens: int,
              param: str) -> dict[str, Any]:
    """Run the generate task exactly as ``POST /generate`` does. Temperature 0 is greedy decoding."""
    t0 = time.monotonic()
    adapter, base, _ = _resolve(st, cfg, body.model, caller)
    temperature = 1.0 if body.temperature is None else body.temperature
    try:
        stop = body.stop_list
    except ValueError as e:
        raise ApiError(400, "invalid_request", str(e), "stop") from None
    req = build(GenerateRequest, param, prompts=prompts, adapter=adapter, base_model=None if adapter else base,
                max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                top_p=body.top_p or 1.0, top_k=0, seed=body.seed, stop=stop)
    return wait_generate(accept_generate(req, caller, st, cfg), gens, t0, cfg)


def _sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
    def frames() -> Iterator[str]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/completions")
def create_completion(body: CompletionCreate, st: Store, gens: Generations, cfg: Config, caller: Caller) -> Any:
    """A text completion per prompt. ``stream``: the worker does not stream tokens yet, so the chunks
    (one per prompt, then ``[DONE]``) are sent once the text is generated. ``prompt_tokens`` is 0:
    prompts are tokenized on the worker and not counted."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = body.max_tokens or min(16, cfg.max_new_tokens)
    out = _generate(st, gens, cfg, caller, body, prompts, max_tokens, "prompt")["outputs"]
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    choices = [{"index": i, "text": o["text"], "logprobs": None, "finish_reason": o["finish_reason"]}
               for i, o in enumerate(out)]
    if not body.stream:
        return head | {"choices": choices, "usage": usage(out)}
    chunks = [head | {"choices": [c]} for c in choices]
    if body.stream_options and body.stream_options.include_usage:
        chunks.append(head | {"choices": [], "usage": usage(out)})
    return _sse(chunks)


@router.post("/chat/completions")
def create_chat_completion(body: ChatCompletionCreate, st: Store, gens: Generations, cfg: Config,
                           caller: Caller) -> Any:
    """The assistant's reply to the messages rendered in Gemma's chat format (``render_chat``).
    ``stream``: the worker does not stream tokens yet, so the chunks (role, the whole text, the
    finish reason, then ``[DONE]``) are sent once the text is generated."""
    max_tokens = body.max_completion_tokens or body.max_tokens or min(256, cfg.max_new_tokens)
    out = _generate(st, gens, cfg, caller, body, [render_chat(body.messages)], max_tokens, "messages")["outputs"][0]
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
    if not body.stream:
        message = {"role": "assistant", "content": out["text"], "refusal": None}
        return head | {"object": "chat.completion", "usage": usage([out]), "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": out["finish_reason"]}]}
    chunk = head | {"object": "chat.completion.chunk"}
    deltas = [{"role": "assistant", "content": ""}, {"content": out["text"]}, {}]
    chunks = [chunk | {"choices": [{"index": 0, "delta": d, "logprobs": None,
                                    "finish_reason": out["finish_reason"] if not d else None}]} for d in deltas]
    if body.stream_options and body.stream_options.include_usage:
        chunks.append(chunk | {"choices": [], "usage": usage([out])})
    return _sse(chunks)
