"""Request limits from settings, each a clear 4xx: body size (413), sizes inside a job or a generate
request (422 ``limit_exceeded``), per-tenant queued + running jobs (429 ``too_many_jobs``) and the
per-tenant generate rate (429 ``rate_limited`` with ``Retry-After``).

The schemas (app/api/schemas.py) carry the hard bounds that OpenAPI shows; the settings here may only
lower them for a deployment. Admin keys (and open mode, which is single-user) are not counted against
the per-tenant job cap or generate rate.
"""

from __future__ import annotations

import json
import math

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import ApiError, error_body
from app.api.schemas import GenerateRequest, JobCreate
from app.core.apikeys import Principal
from app.core.settings import Settings, get_settings
from app.core.store import JobStore

#: Routes that stream their own (multipart) body to disk with FTAAS_MAX_UPLOAD_BYTES as the limit.
UPLOAD_ROUTES = {("POST", "/datasets"), ("POST", "/v1/files")}


def _exceeded(field: str, message: str) -> ApiError:
    return ApiError(422, "limit_exceeded", f"{field}: {message}", field)


def check_job(body: JobCreate, cfg: Settings) -> None:
    """The deployment's limits on a job body (inline rows, steps x batch, max_length). A default the
    user did not set is lowered to fit rather than refused."""
    for field, spec in (("dataset.rows", body.dataset),
                        ("validation.dataset.rows", body.validation.dataset if body.validation else None)):
        if spec is not None and spec.rows is not None and len(spec.rows) > cfg.max_inline_rows:
            raise _exceeded(field, f"{len(spec.rows):,} inline rows; this server takes at most "
                                   f"{cfg.max_inline_rows:,} (upload a file with POST /datasets instead)")
    hp = body.hyperparameters
    if "max_length" not in hp.model_fields_set:  # the default, not the user's ask: fit it to this server
        hp.max_length = min(hp.max_length, cfg.max_length)
    examples = hp.max_steps * hp.batch_size * hp.gradient_accumulation_steps
    if examples > cfg.max_step_examples:
        raise _exceeded("hyperparameters.max_steps",
                        f"max_steps x batch_size x gradient_accumulation_steps = {examples:,} examples; "
                        f"this server trains at most {cfg.max_step_examples:,} per job")
    if hp.max_length > cfg.max_length:
        raise _exceeded("hyperparameters.max_length", f"{hp.max_length} tokens; at most {cfg.max_length} here")


def check_generate(body: GenerateRequest, cfg: Settings) -> None:
    """The deployment's limits on a generate request (n, rows = prompts x n, prompt length, max_new_tokens)."""
    prompts = body.prompt_list
    if body.n > cfg.generate_max_n:
        raise _exceeded("n", f"{body.n} completions per prompt; at most {cfg.generate_max_n} here")
    if len(prompts) > cfg.max_prompts:
        raise _exceeded("prompts", f"{len(prompts)} prompts; at most {cfg.max_prompts} per request")
    if len(prompts) * body.n > cfg.max_prompts:
        raise _exceeded("n", f"{len(prompts)} prompts x n={body.n} = {len(prompts) * body.n} completions; "
                             f"at most {cfg.max_prompts} per request")
    longest = max((len(p) for p in prompts), default=0)
    if longest > cfg.max_prompt_chars:
        raise _exceeded("prompt" if body.prompt is not None else "prompts",
                        f"a prompt of {longest:,} characters; at most {cfg.max_prompt_chars:,}")
    if "max_new_tokens" not in body.model_fields_set:  # the default, not the user's ask
        body.max_new_tokens = min(body.max_new_tokens, cfg.max_new_tokens)
    if body.max_new_tokens > cfg.max_new_tokens:
        raise _exceeded("max_new_tokens", f"{body.max_new_tokens}; at most {cfg.max_new_tokens} here")


def take_job_slot(st: JobStore, caller: Principal, job_id: str, cfg: Settings) -> None:
    """429 when the caller's tenant already has ``max_active_jobs`` queued or running."""
    if caller.admin:
        return
    if not st.reserve_slot(caller.tenant, job_id, cfg.max_active_jobs):
        raise ApiError(429, "too_many_jobs",
                       f"tenant {caller.tenant!r} already has {cfg.max_active_jobs} queued or running jobs; "
                       "wait for one to end or cancel one", headers={"Retry-After": "10"})


def count_generate(st: JobStore, caller: Principal, cfg: Settings) -> None:
    """429 with Retry-After when the caller's tenant is over its generate rate (a fixed window)."""
    if caller.admin:
        return
    count, left = st.count_request(caller.tenant, cfg.generate_rate_window_s)
    if count > cfg.generate_rate:
        retry = max(1, math.ceil(left))
        raise ApiError(429, "rate_limited",
                       f"over {cfg.generate_rate} generate requests per {cfg.generate_rate_window_s} s; "
                       f"retry in {retry} s", headers={"Retry-After": str(retry)})


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_body_bytes``, by Content-Length and by
    counting the streamed body (the upload routes have their own, larger limit). The body is read
    here, up to the limit, and replayed to the app, so an oversize one is never read whole."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in UPLOAD_ROUTES \
                or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = get_settings().max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await _too_large(send, limit, scope["path"])
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, limit, scope["path"])
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int, path: str) -> None:
    err = ApiError(413, "payload_too_large", f"the request body is over this server's limit of {limit:,} bytes")
    # OpenAI's shape under /v1, as app/api/openai/routes.py answers
    raw = json.dumps(error_body(err, "openai" if path.startswith("/v1/") else "ftaas")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": raw})
