"""OpenAI-compatible routes under ``/v1``, so code written with the official ``openai`` client runs on ftaas.

Every route maps onto ftaas's own paths rather than beside them: files are uploaded datasets
(``upload_dataset``, the file id is the ``ds_…`` id), fine-tuning jobs are ftaas jobs created by
``create_job`` (the job id is the ``job_…`` id), and completions are the generate task run by
``generate``. So ``/jobs`` and ``/v1/fine_tuning/jobs`` list the same jobs. Errors on these routes
come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}`` (422 becomes 400, as
OpenAI answers), made from the envelope the ftaas handler would have answered with.

Mappings (see README, "OpenAI-compatible API"): ``n_epochs`` → ``max_steps`` = ceil(n_epochs x usable
rows / batch_size); ``batch_size`` → micro-batch (its largest divisor up to 8) x gradient accumulation;
``learning_rate_multiplier`` x 2e-4 → ``learning_rate``; no validation file → no held-out rows;
``suffix`` → the job's ``name``. A succeeded job's ``fine_tuned_model`` is ``ft:<base>[:<suffix>]:<job id>``;
the bare job id names it too.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from fastapi import Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.api.auth import Caller
from app.api.deps import Config, Store
from app.api.errors import ApiError
from app.api.openai.protocol import (
    AUTO_EPOCHS,
    BASE_LEARNING_RATE,
    ORGANIZATION_ID,
    ChatCompletionCreate,
    ChatMessageIn,
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
from app.api.routes.datasets import FILE_FIELD, Datasets, dataset_rows, delete_dataset, get_dataset, upload_dataset
from app.api.routes.jobs import cancel_job, create_job, generate, get_job
from app.api.schemas import DEFAULT_TEMPLATE, DatasetId, ErrorEnvelope, GenerateRequest, JobCreate, JobId
from app.core.apikeys import Principal
from app.core.formats import detect_format, row_stats
from app.core.settings import Settings
from app.core.store import EVENTS_MAXLEN, JobStore

_PARAMS = {"base_model": "model", "adapter": "model", "dataset.id": "training_file",
           "validation.dataset.id": "validation_file", "id": None}
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")
_JOB_ID = re.compile(r"job_[0-9a-f]{22}")
_EVENT_ID = r"^ftevent-\d+-\d+$"
M = TypeVar("M", bound=BaseModel)


def _openai_shape(resp: Response) -> JSONResponse:
    """The ftaas envelope ``{"error": {code, message, field}}`` as OpenAI's error body."""
    err = json.loads(bytes(resp.body))["error"]
    status = 400 if resp.status_code == 422 else resp.status_code
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = _PARAMS.get(err.get("field"), err.get("field"))
    headers = {k: v for k, v in resp.headers.items() if k.lower() in ("retry-after", "allow", "www-authenticate")}
    return JSONResponse({"error": {"message": err["message"], "type": kind, "param": param, "code": err["code"]}},
                        status, headers=headers)


class OpenAIRoute(APIRoute):
    """Answers any error with the response the app's own handler makes, reshaped for OpenAI's clients."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                found = next((request.app.exception_handlers[c] for c in type(exc).__mro__
                              if c in request.app.exception_handlers), None)
                if found is None:
                    raise
                resp = found(request, exc)
                return _openai_shape(await resp if inspect.isawaitable(resp) else resp)

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


def _build(model: type[M], param: str | None, **fields: Any) -> M:
    """An ftaas request model from mapped OpenAI fields; what does not fit ftaas's bounds is a 400."""
    try:
        return model(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, "invalid_request", f"{param or where}: {first['msg']} ({where} in ftaas terms)",
                       param or where) from None


# -- files ------------------------------------------------------------------------------------------

class _PurposeTee(Request):
    """The request, its body also fed to a second multipart parser that keeps the ``purpose`` field;
    a purpose other than ``fine-tune`` stops the upload as soon as it is read."""

    def __init__(self, request: Request) -> None:
        super().__init__(request.scope, request.receive)
        self.purpose: str | None = None
        self._name, self._value, self._hfield, self._hvalue = b"", b"", b"", b""
        self._broken = False
        _, options = parse_options_header(request.headers.get("content-type", ""))
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

    async def stream(self) -> AsyncGenerator[bytes, None]:
        async for chunk in super().stream():
            try:
                if not self._broken:
                    self._parser.write(chunk)
            except ApiError:
                raise
            except Exception:  # a malformed body is the upload parser's to report
                self._broken = True
            yield chunk


def _file(meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": meta["id"], "bytes": meta["bytes"], "created_at": int(meta["created_at"]),
            "filename": meta["filename"]}


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
    tee = _PurposeTee(request)
    meta = await upload_dataset(tee, Response(), cfg, ds, caller)
    columns = set(meta["columns"])
    problem = None if tee.purpose else "purpose is required ('fine-tune')"
    if problem is None and "messages" not in columns and not {"prompt", "completion"} <= columns:
        problem = f"rows need a 'messages' column or 'prompt' and 'completion' columns (found {sorted(columns)})"
    if problem:
        delete_dataset(meta["id"], ds, cfg, caller)
        raise ApiError(400, "invalid_file_format", problem, "purpose" if not tee.purpose else FILE_FIELD)
    return _file(meta)


@router.get("/files", response_model=FileList)
def list_files(ds: Datasets, caller: Caller, limit: int = Query(20, ge=1, le=100),
               after: DatasetId | None = None) -> dict[str, Any]:
    items, has_more = ds.page(limit, after, caller.scope)
    return {"data": [_file(m) for m in items], "has_more": has_more}


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, ds: Datasets, caller: Caller) -> dict[str, Any]:
    return _file(get_dataset(file_id, ds, caller))


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, ds: Datasets, cfg: Config, caller: Caller) -> dict[str, Any]:
    delete_dataset(file_id, ds, cfg, caller)
    return {"id": file_id, "deleted": True}


# -- fine-tuning jobs -------------------------------------------------------------------------------

def _job_create(body: FineTuningJobCreate, ds: Datasets, cfg: Settings, caller: Principal) -> JobCreate:
    """The ftaas job an OpenAI job body asks for; ``max_steps`` from the training file's usable rows."""
    hp = body.hp
    rows = dataset_rows(ds, cfg, body.training_file, "dataset.id", caller=caller)
    fmt = detect_format("auto", False, set().union(*(r.keys() for r in rows)))
    usable = len(row_stats(fmt, DEFAULT_TEMPLATE, rows)[0])
    if hp.batch_size == "auto":
        micro, accumulation = 1, 4
    else:
        micro = max(d for d in range(1, min(hp.batch_size, 8) + 1) if hp.batch_size % d == 0)
        accumulation = hp.batch_size // micro
    epochs = AUTO_EPOCHS if hp.n_epochs == "auto" else hp.n_epochs
    max_steps = min(max(1, math.ceil(epochs * usable / (micro * accumulation))), 10_000)
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
    validation = {"dataset": {"id": body.validation_file}} if body.validation_file else {"fraction": 0.0}
    hyper = {"max_steps": max_steps, "learning_rate": BASE_LEARNING_RATE * multiplier, "batch_size": micro,
             "gradient_accumulation_steps": accumulation, "seed": body.seed}
    return _build(JobCreate, None, base_model=body.model, dataset={"id": body.training_file},
                  validation=validation, hyperparameters=hyper, name=body.suffix, metadata=body.metadata or {})


def fine_tuned_model(job: dict[str, Any]) -> str:
    suffix = job.get("name") or ""
    middle = f"{suffix}:" if _SUFFIX.fullmatch(suffix) else ""
    return f"ft:{job['request']['base_model']}:{middle}{job['id']}"


def _trained_tokens(st: JobStore, job_id: str) -> int | None:
    seen = [p["tokens_seen"] for p in st.metric_series(job_id) if p.get("tokens_seen") is not None]
    return seen[-1] if seen else None


def _ft_job(st: JobStore, job: dict[str, Any]) -> dict[str, Any]:
    req, status = job["request"], job["status"]
    hp, stats = req["hyperparameters"], job.get("dataset_stats") or {}
    epochs = stats.get("epochs")
    hyper = {"n_epochs": int(epochs) if epochs is not None and float(epochs).is_integer() else epochs,
             "batch_size": hp["batch_size"] * hp["gradient_accumulation_steps"],
             "learning_rate_multiplier": round(hp["learning_rate"] / BASE_LEARNING_RATE, 6)}
    eta = (job.get("progress") or {}).get("eta_seconds")
    err = job.get("error")
    return {
        "id": job["id"], "model": req["base_model"], "status": status, "created_at": int(job["created_at"]),
        "finished_at": int(job["finished_at"]) if job.get("finished_at") else None,
        "estimated_finish": int(time.time() + eta) if status == "running" and eta is not None else None,
        "fine_tuned_model": fine_tuned_model(job) if status == "succeeded" else None,
        "trained_tokens": _trained_tokens(st, job["id"]) if status != "queued" else None,
        "error": {"code": err["code"], "message": err["message"], "param": None} if err else None,
        "hyperparameters": hyper, "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "seed": hp.get("seed"), "training_file": req["dataset"].get("id"),
        "validation_file": ((req.get("validation") or {}).get("dataset") or {}).get("id"),
        "metadata": req.get("metadata") or None,
    }


@router.post("/fine_tuning/jobs", response_model=FineTuningJob)
def create_fine_tuning_job(body: FineTuningJobCreate, st: Store, ds: Datasets, cfg: Config,
                           caller: Caller) -> dict[str, Any]:
    """Create an ftaas job from the OpenAI body (checked and queued exactly as ``POST /jobs``)."""
    return _ft_job(st, create_job(_job_create(body, ds, cfg, caller), Response(), st, ds, cfg, caller))


@router.get("/fine_tuning/jobs", response_model=FineTuningJobList)
def list_fine_tuning_jobs(
    st: Store, caller: Caller, limit: int = Query(20, ge=1, le=100), after: JobId | None = None,
) -> dict[str, Any]:
    """Newest first; ``after`` is the last id of the previous page."""
    jobs, has_more = st.page(limit, after, tenant=caller.scope)
    return {"data": [_ft_job(st, j) for j in jobs], "has_more": has_more}


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_fine_tuning_job(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    return _ft_job(st, get_job(job_id, st, caller))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_fine_tuning_job(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    """Queued: ``cancelled`` at once. Running: still ``running`` until it stops at its next step."""
    return _ft_job(st, cancel_job(job_id, st, caller))


_MESSAGES: dict[str, Callable[[dict[str, Any]], str]] = {
    "queued": lambda d: "Fine-tuning job queued",
    "started": lambda d: "Fine-tuning job started",
    "dataset_stats": lambda d: f"Training file validated: {d.get('rows_used', '?')} examples",
    "step": lambda d: f"Step {d.get('step')}/{d.get('total_steps')}: training loss={d.get('loss', float('nan')):.4f}",
    "eval": lambda d: f"Step {d.get('step')}: validation loss={d.get('eval_loss', float('nan')):.4f}",
    "cancel_requested": lambda d: "Cancellation requested; the job stops at its next step",
    "adapter_saved": lambda d: "Adapter saved",
    "succeeded": lambda d: "The job has successfully completed",
    "failed": lambda d: f"Fine-tuning job failed: {(d.get('error') or {}).get('message', 'unknown error')}",
    "cancelled": lambda d: "Fine-tuning job cancelled",
}


def _ft_event(ev: dict[str, Any]) -> dict[str, Any]:
    kind, data = ev["type"], ev["data"]
    message = _MESSAGES.get(kind, lambda d: kind.replace("_", " ").capitalize())(data)
    if kind == "step" and "loss" in data:
        data = data | {"train_loss": data["loss"]}
    return {"id": f"ftevent-{ev['id']}", "created_at": int(ev["time"]), "message": message, "data": data,
            "level": "error" if kind == "failed" else "warn" if kind.startswith("cancel") else "info",
            "type": "metrics" if kind in ("step", "eval") else "message"}


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=FineTuningJobEventList)
def list_fine_tuning_events(
    job_id: str, st: Store, caller: Caller, limit: int = Query(20, ge=1, le=100),
    after: str | None = Query(None, pattern=_EVENT_ID, description="The last event id of the previous page."),
) -> dict[str, Any]:
    """The job's ftaas event stream as OpenAI events, newest first (the last EVENTS_MAXLEN events)."""
    get_job(job_id, st, caller)
    events = st.events(job_id, None, EVENTS_MAXLEN)[::-1]
    if after:
        stream_id = after.removeprefix("ftevent-")
        events = [e for e in events if _older(e["id"], stream_id)]
    return {"data": [_ft_event(e) for e in events[:limit]], "has_more": len(events) > limit}


def _older(a: str, b: str) -> bool:
    return tuple(map(int, a.split("-"))) < tuple(map(int, b.split("-")))


# -- models -----------------------------------------------------------------------------------------

def _resolve(st: JobStore, cfg: Settings, model: str,
             caller: Principal) -> tuple[str | None, str, dict[str, Any] | None]:
    """(adapter, base model, job) for a model id: a known base model, a fine-tuned model id or a job id."""
    if model in cfg.known_models:
        return None, model, None
    job_id = model.rsplit(":", 1)[-1]
    job = st.get(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None or not caller.owns(job.get("tenant")) or job["status"] != "succeeded" \
            or model not in (job_id, fine_tuned_model(job)):
        raise ApiError(404, "model_not_found", f"The model {model!r} does not exist: name a base model "
                       f"({', '.join(cfg.known_models)}) or a succeeded job's fine_tuned_model", "model")
    return job_id, job["request"]["base_model"], job


def _model(job: dict[str, Any]) -> dict[str, Any]:
    return {"id": fine_tuned_model(job), "created": int(job["finished_at"] or job["created_at"]),
            "owned_by": ORGANIZATION_ID}


@router.get("/models", response_model=ModelList)
def list_models(st: Store, cfg: Config, caller: Caller) -> dict[str, Any]:
    """Base models ftaas knows, then every succeeded job's fine-tuned model, newest first."""
    data = [{"id": m, "created": 0, "owned_by": "ftaas"} for m in cfg.known_models]
    after, more = None, True
    while more:
        jobs, more = st.page(100, after, "succeeded", caller.scope)
        data += [_model(j) for j in jobs]
        after = jobs[-1]["id"] if jobs else None
        more = more and after is not None
    return {"data": data}


@router.get("/models/{model:path}", response_model=Model)
def retrieve_model(model: str, st: Store, cfg: Config, caller: Caller) -> dict[str, Any]:
    _, base, job = _resolve(st, cfg, model, caller)
    return _model(job) if job else {"id": base, "created": 0, "owned_by": "ftaas"}


# -- completions ------------------------------------------------------------------------------------

def render_chat(messages: list[ChatMessageIn]) -> str:
    """Gemma's chat format (what its tokenizer's template makes, without ``<bos>``, which the
    tokenizer adds): system and developer text goes before the first user turn."""
    system = "\n\n".join(m.text.strip() for m in messages if m.role in ("system", "developer"))
    turns = [("model" if m.role == "assistant" else "user", m.text.strip())
             for m in messages if m.role in ("user", "assistant")]
    if system:
        turns = [("user", f"{system}\n\n{turns[0][1]}"), *turns[1:]] if turns and turns[0][0] == "user" else [
            ("user", system), *turns]
    return "".join(f"<start_of_turn>{role}\n{text}<end_of_turn>\n" for role, text in turns) + "<start_of_turn>model\n"


def _generate(st: JobStore, cfg: Settings, caller: Principal, body: CompletionCreate | ChatCompletionCreate,
              prompts: list[str], max_tokens: int, param: str) -> dict[str, Any]:
    """Run the generate task exactly as ``POST /generate`` does. Temperature 0 is greedy decoding."""
    adapter, base, _ = _resolve(st, cfg, body.model, caller)
    temperature = 1.0 if body.temperature is None else body.temperature
    try:
        stop = body.stop_list
    except ValueError as e:
        raise ApiError(400, "invalid_request", str(e), "stop") from None
    req = _build(GenerateRequest, param, prompts=prompts, adapter=adapter, base_model=None if adapter else base,
                 max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                 top_p=body.top_p or 1.0, top_k=0, seed=body.seed, stop=stop)
    return generate(req, st, cfg, caller)


def _usage(outputs: list[dict[str, Any]]) -> dict[str, int]:
    tokens = sum(o["tokens"] for o in outputs)
    return {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}


def _sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
    def frames() -> Iterator[str]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/completions")
def create_completion(body: CompletionCreate, st: Store, cfg: Config, caller: Caller) -> Any:
    """A text completion per prompt. ``stream``: the worker does not stream tokens yet, so the chunks
    (one per prompt, then ``[DONE]``) are sent once the text is generated. ``prompt_tokens`` is 0:
    prompts are tokenized on the worker and not counted."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = body.max_tokens or min(16, cfg.max_new_tokens)
    out = _generate(st, cfg, caller, body, prompts, max_tokens, "prompt")["outputs"]
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    choices = [{"index": i, "text": o["text"], "logprobs": None, "finish_reason": o["finish_reason"]}
               for i, o in enumerate(out)]
    if not body.stream:
        return head | {"choices": choices, "usage": _usage(out)}
    chunks = [head | {"choices": [c]} for c in choices]
    if body.stream_options and body.stream_options.include_usage:
        chunks.append(head | {"choices": [], "usage": _usage(out)})
    return _sse(chunks)


@router.post("/chat/completions")
def create_chat_completion(body: ChatCompletionCreate, st: Store, cfg: Config, caller: Caller) -> Any:
    """The assistant's reply to the messages rendered in Gemma's chat format (``render_chat``).
    ``stream``: the worker does not stream tokens yet, so the chunks (role, the whole text, the
    finish reason, then ``[DONE]``) are sent once the text is generated."""
    max_tokens = body.max_completion_tokens or body.max_tokens or min(256, cfg.max_new_tokens)
    out = _generate(st, cfg, caller, body, [render_chat(body.messages)], max_tokens, "messages")["outputs"][0]
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
    if not body.stream:
        message = {"role": "assistant", "content": out["text"], "refusal": None}
        return head | {"object": "chat.completion", "usage": _usage([out]), "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": out["finish_reason"]}]}
    chunk = head | {"object": "chat.completion.chunk"}
    deltas = [{"role": "assistant", "content": ""}, {"content": out["text"]}, {}]
    chunks = [chunk | {"choices": [{"index": 0, "delta": d, "logprobs": None,
                                    "finish_reason": out["finish_reason"] if not d else None}]} for d in deltas]
    if body.stream_options and body.stream_options.include_usage:
        chunks.append(chunk | {"choices": [], "usage": _usage([out])})
    return _sse(chunks)
