"""OpenAI-compatible routes under ``/v1``, so code written with the official ``openai`` client runs on ftaas.

Every route maps onto ftaas's own objects through the same services (app/api/services) as the ftaas routes:
files are uploaded datasets (the file id is the ``ds_…`` id), fine-tuning jobs are ftaas jobs submitted by
``submit_job`` (the job id is the ``job_…`` id), and completions are the generate task. So ``/jobs`` and
``/v1/fine_tuning/jobs`` list the same jobs. Errors on these routes come in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}`` (422 becomes 400, as OpenAI answers), rendered by
app/api/errors.py from the same error as the ftaas envelope; an id that names nothing (or is not an ftaas id
at all) is "No such file" / "No such fine-tuning job", as OpenAI words it. The mappings are in
app/api/openai/mapping.py (jobs, files, models), completions.py and streaming.py (completions).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Query, Request, Response
from fastapi.routing import APIRoute, APIRouter

from app.api.auth import Caller
from app.api.deps import Config, Datasets, Generations, Store
from app.api.errors import ApiError, as_api_error, error_response
from app.api.openai.completions import (
    CHAT_PARAMS,
    COMPLETION_PARAMS,
    chat_choices,
    completion_choices,
    native_request,
    renamed,
    render_chat,
    usage,
)
from app.api.openai.mapping import (
    file_object,
    fine_tuned_model,
    fine_tuning_event,
    fine_tuning_job,
    job_create,
    model_object,
)
from app.api.openai.params import ChatCompletionCreate, CompletionCreate
from app.api.openai.protocol import (
    CheckpointList,
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
from app.api.openai.purpose import PurposeSniffer
from app.api.openai.streaming import chat_stream, completion_stream
from app.api.schemas import ErrorEnvelope
from app.api.services.datasets import FILE_FIELD, delete_dataset, owned_dataset, rows_of, upload_dataset
from app.api.services.generate import accept_generate, stream_generate, wait_generate
from app.api.services.jobs import cancel_job, owned_job, submit_job
from app.core.apikeys import Principal
from app.core.ids import is_dataset_id, is_job_id
from app.core.jobs import GenerateTask
from app.core.settings import Settings
from app.core.store import EVENTS_MAXLEN, DatasetStore, JobStore

_EVENT_ID = r"^ftevent-\d+-\d+$"
_METADATA_KEY = re.compile(r"^metadata\[(.+)\]$")


class OpenAIRoute(APIRoute):
    """Answers any error in OpenAI's shape: the same error the app's own handlers would answer with."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_response(as_api_error(request, exc, "openai"), "openai")

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


def _no_file(file_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, "file_not_found", f"No such file: {file_id}", param)


def _no_job(job_id: str) -> ApiError:
    return ApiError(404, "fine_tuning_job_not_found", f"No such fine-tuning job: {job_id}")


def _file(ds: DatasetStore, file_id: str, caller: Principal, param: str | None = None) -> dict[str, Any]:
    """The caller's file (dataset), or OpenAI's 404 for an id that names none or is no ftaas id at all."""
    if not is_dataset_id(file_id):
        raise _no_file(file_id, param)
    try:
        return owned_dataset(ds, file_id, caller)
    except ApiError as e:
        raise _no_file(file_id, param) if e.status == 404 else e from None


def _job(st: JobStore, job_id: str, caller: Principal) -> dict[str, Any]:
    if not is_job_id(job_id):
        raise _no_job(job_id)
    try:
        return owned_job(st, job_id, caller)
    except ApiError as e:
        raise _no_job(job_id) if e.status == 404 else e from None


# -- files ------------------------------------------------------------------------------------------

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
    sniffer = PurposeSniffer(content_type)
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
               after: str | None = Query(None, max_length=200)) -> dict[str, Any]:
    if after is not None and not is_dataset_id(after):
        raise _no_file(after, "after")
    items, has_more = ds.page(limit, after, caller.scope)
    return {"data": [file_object(m) for m in items], "has_more": has_more}


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, ds: Datasets, caller: Caller) -> dict[str, Any]:
    return file_object(_file(ds, file_id, caller))


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, ds: Datasets, cfg: Config, caller: Caller) -> dict[str, Any]:
    _file(ds, file_id, caller)
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
    """Create an ftaas job from the OpenAI body (checked and queued exactly as ``POST /jobs``).
    ``integrations`` are accepted and ignored: ftaas reports to no tracker."""
    _file(ds, body.training_file, caller, "training_file")
    if body.validation_file is not None:
        _file(ds, body.validation_file, caller, "validation_file")
    job = job_create(body, rows_of(ds, cfg, body.training_file, caller, "dataset.id"))
    return _ft_job(st, submit_job(job, caller, st, ds, cfg))


def _metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[key]=value`` query parameters (how the official client sends its ``metadata`` filter)."""
    return {m.group(1): v for k, v in request.query_params.items() if (m := _METADATA_KEY.match(k))}


@router.get("/fine_tuning/jobs", response_model=FineTuningJobList)
def list_fine_tuning_jobs(
    request: Request, st: Store, caller: Caller, limit: int = Query(20, ge=1, le=100),
    after: str | None = Query(None, max_length=200),
) -> dict[str, Any]:
    """Newest first; ``after`` is the last id of the previous page; ``metadata[key]=value`` keeps only the
    jobs whose metadata holds every such pair."""
    if after is not None and not is_job_id(after):
        raise _no_job(after)
    wanted = _metadata_filter(request)
    if not wanted:
        jobs, has_more = st.page(limit, after, tenant=caller.scope)
        return {"data": [_ft_job(st, j) for j in jobs], "has_more": has_more}
    found: list[dict[str, Any]] = []
    more = True
    while more and len(found) <= limit:
        page, more = st.page(100, after, tenant=caller.scope)
        found += [j for j in page if wanted.items() <= (j["request"].get("metadata") or {}).items()]
        after = page[-1]["id"] if page else None
        more = more and after is not None
    return {"data": [_ft_job(st, j) for j in found[:limit]], "has_more": len(found) > limit}


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_fine_tuning_job(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    return _ft_job(st, _job(st, job_id, caller))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_fine_tuning_job(job_id: str, st: Store, caller: Caller) -> dict[str, Any]:
    """Queued: ``cancelled`` at once. Running: still ``running`` until it stops at its next step."""
    _job(st, job_id, caller)
    return _ft_job(st, cancel_job(st, job_id, caller))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=FineTuningJobEventList)
def list_fine_tuning_events(
    job_id: str, st: Store, caller: Caller, limit: int = Query(20, ge=1, le=100),
    after: str | None = Query(None, pattern=_EVENT_ID, description="The last event id of the previous page."),
) -> dict[str, Any]:
    """The job's ftaas event stream as OpenAI events, newest first (the last EVENTS_MAXLEN events)."""
    _job(st, job_id, caller)
    events = st.events(job_id, None, EVENTS_MAXLEN)[::-1]
    if after:
        stream_id = after.removeprefix("ftevent-")
        events = [e for e in events if _older(e["id"], stream_id)]
    return {"data": [fine_tuning_event(e) for e in events[:limit]], "has_more": len(events) > limit}


def _older(a: str, b: str) -> bool:
    return tuple(map(int, a.split("-"))) < tuple(map(int, b.split("-")))


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList)
def list_fine_tuning_checkpoints(job_id: str, st: Store, caller: Caller, limit: int = Query(10, ge=1, le=100),
                                 after: str | None = Query(None, max_length=200)) -> dict[str, Any]:
    """Empty for now: ftaas keeps a job's final adapter, not its intermediate checkpoints as models."""
    _job(st, job_id, caller)
    return {"data": [], "has_more": False}


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

def _accept(st: JobStore, cfg: Settings, caller: Principal, body: CompletionCreate | ChatCompletionCreate,
            prompts: list[str], max_tokens: int, params: dict[str, str]) -> GenerateTask:
    """The generate task, accepted exactly as ``POST /generate`` accepts one; errors name OpenAI's fields."""
    body.unsupported()
    adapter, base, _ = _resolve(st, cfg, body.model, caller)
    try:
        return accept_generate(native_request(body, prompts, max_tokens, adapter, base, params), caller, st, cfg)
    except ApiError as e:
        raise renamed(e, params) from None


def _head(prefix: str, body: CompletionCreate | ChatCompletionCreate) -> dict[str, Any]:
    return {"id": f"{prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}


@router.post("/completions")
def create_completion(body: CompletionCreate, st: Store, gens: Generations, cfg: Config, caller: Caller) -> Any:
    """``n`` text completions per prompt, indexed prompt-major. ``echo`` prepends the prompt (with
    ``max_tokens: 0`` and ``logprobs``: the prompt's log probabilities only); ``stream``: a chunk per new
    piece of text (app/api/openai/streaming.py)."""
    t0 = time.monotonic()
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = min(16, cfg.max_new_tokens) if body.max_tokens is None else body.max_tokens
    task = _accept(st, cfg, caller, body, prompts, max_tokens, COMPLETION_PARAMS)
    head = _head("cmpl", body) | {"object": "text_completion"}
    if body.stream:
        return completion_stream(head, body, prompts, stream_generate(task, gens, t0, cfg))
    out = wait_generate(task, gens, t0, cfg)["outputs"]
    return head | {"choices": completion_choices(out, prompts, body), "usage": usage(out, body.choices_per_prompt)}


@router.post("/chat/completions")
def create_chat_completion(body: ChatCompletionCreate, st: Store, gens: Generations, cfg: Config,
                           caller: Caller) -> Any:
    """``n`` replies of the assistant to the messages rendered in Gemma's chat format (``render_chat``);
    ``stream``: the role, then a chunk per new piece of text, then the finish reason."""
    t0 = time.monotonic()
    max_tokens = body.max_completion_tokens or body.max_tokens or min(256, cfg.max_new_tokens)
    params = CHAT_PARAMS | ({"max_new_tokens": "max_tokens"} if body.max_completion_tokens is None else {})
    task = _accept(st, cfg, caller, body, [render_chat(body.messages)], max_tokens, params)
    head = _head("chatcmpl", body)
    if body.stream:
        return chat_stream(head, body, stream_generate(task, gens, t0, cfg))
    out = wait_generate(task, gens, t0, cfg)["outputs"]
    return head | {"object": "chat.completion", "choices": chat_choices(out, body),
                   "usage": usage(out, body.choices_per_prompt)}
