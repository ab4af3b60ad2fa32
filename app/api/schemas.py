"""The API's response bodies and the generate request, with the bounds users see in OpenAPI. The job request
models are the job contract in app/core/jobs.py (re-exported here for the routes)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import llguidance
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from app.core.jobs import (  # noqa: F401  (re-exported)
    ALL_PROJECTIONS,
    DEFAULT_TEMPLATE,
    MAX_INLINE_ROWS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    TERMINAL_STATUSES,
    CellValue,
    ChatMessage,
    DatasetId,
    DatasetSpec,
    HubDataset,
    HubDatasetId,
    Hyperparameters,
    JobCreate,
    JobId,
    JobPhase,
    JobStatus,
    Key,
    Label,
    LoraSpec,
    MetaValue,
    ModelName,
    Revision,
    Row,
    ShortStr,
    Strict,
    TargetModule,
    Text,
    ValidationSpec,
    template_fields,
)


class PhaseProgress(BaseModel):
    done: int
    total: int


class Progress(BaseModel):
    step: int = 0
    total_steps: int
    fraction: float = 0.0
    eta_seconds: float | None = Field(None, description="Seconds until the whole job ends (every phase left), "
                                      "from rates measured in this run; null until there is one to base it on.")
    phase: JobPhase | None = Field(
        None, description="What the job is doing (null on records older than phases).")
    phase_progress: PhaseProgress | None = Field(None, description="Progress inside the phase, where it has any "
                                                 "(evaluation batches, training steps).")


class Metrics(BaseModel):
    loss: float | None = None
    learning_rate: float | None = None
    epoch: float | None = None
    grad_norm: float | None = None


class TokenStats(BaseModel):
    mean: float
    p95: int
    max: int
    over_max_length: int = Field(description="Examples truncated to max_length.")


class DatasetStats(BaseModel):
    format: str
    rows_total: int
    rows_used: int
    rows_dropped: dict[str, int] = Field(description="Dropped rows by reason.")
    train_rows: int | None = None
    validation_rows: int | None = None
    epochs: float | None = Field(None, description="Passes over the training rows that max_steps amounts to.")
    tokens: TokenStats | None = Field(None, description="Measured by the worker with the model's tokenizer.")


class Sample(BaseModel):
    prompt: str
    before: str
    after: str | None = None


class Evaluation(BaseModel):
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    relative_change: float | None = Field(None, description="(after - before) / before.")
    samples: list[Sample] = Field(default_factory=list)


class MetricPoint(BaseModel):
    step: int
    time: float = Field(description="Seconds since training started.")
    loss: float | None = None
    learning_rate: float | None = None
    eval_loss: float | None = None
    tokens_seen: int | None = None


class MetricSeries(BaseModel):
    data: list[MetricPoint]


class JobEvent(BaseModel):
    id: str = Field(description="Stream id; pass as `after` or Last-Event-ID to resume.")
    type: str
    time: float
    data: dict[str, Any] = Field(default_factory=dict)


class JobEventList(BaseModel):
    data: list[JobEvent]
    has_more: bool
    next_after: str | None = None


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    name: str | None = None
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress
    metrics: Metrics = Field(default_factory=Metrics)
    request: dict[str, Any] = Field(description="The request as accepted, inline rows summarised by count.")
    error: JobError | None = None
    adapter: str | None = Field(None, description="Adapter id for /generate, once succeeded.")
    cancel_requested: bool = False
    attempts: int = Field(0, ge=0, description="How many times a worker has started the job: above 1 after it "
                          "was requeued because its worker was lost (a SIGTERM'd worker's resume is the same attempt).")
    dataset_stats: DatasetStats | None = None
    evaluation: Evaluation | None = None
    tenant: str | None = Field(None, description="The tenant whose API key created the job.")


class JobList(BaseModel):
    data: list[Job]
    has_more: bool
    next_after: str | None = Field(None, description="Pass as `after` for the next page.")


TOKEN_ID = re.compile(r"[0-9]{1,9}")


class GenerateRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "Quote: Imagination is more", "max_new_tokens": 4},
        {"prompts": ["Quote: Be", "Quote: Stay"], "max_new_tokens": 2, "do_sample": True, "seed": 1},
    ]})
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None
    prompts: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]] | None
    ) = Field(None, min_length=1, max_length=MAX_PROMPTS)
    adapter: JobId | None = Field(None, description="A succeeded job's id; absent: the base model.")
    base_model: ModelName | None = Field(
        None, description="Base model when no adapter is given; default from settings.")
    echo: bool = Field(False, description="Also return the prompt's tokens with their logprobs (with `logprobs`), "
                       "before the generated ones; `text` stays the completion. Declared before max_new_tokens, "
                       "whose check reads it.")
    max_new_tokens: int = Field(64, ge=0, le=MAX_NEW_TOKENS, description="0 only with echo: score the prompt.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, le=5.0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    top_k: int = Field(50, ge=0, le=1_000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=8, description="Generation ends at the first of these strings."
    )
    stream: bool = Field(False, description="Answer with server-sent events: `token` events as text is generated "
                         "(output index and new text), then one `done` event with the whole response.")
    n: int = Field(1, ge=1, le=MAX_PROMPTS, description="Completions per prompt: `outputs[i * n + j]` is prompt i's "
                   "completion j; with a seed, completion j samples with seed + j. Prompts x n count against the "
                   "server's prompt limit.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return each token's logprob and its k likeliest "
                                 "alternatives (k = this; 0: the chosen tokens' only), from the model's logits "
                                 "before temperature, top-k and top-p.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI's: minus this from the logit of every "
                                    "token the completion has generated.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Minus this times how often the completion "
                                     "has generated the token.")
    logit_bias: dict[str, float] = Field(
        default_factory=dict, max_length=300, description="Token id (a string) -> added to its logit before "
        "sampling (-100 bans it, +100 all but forces it); ids must be below the model's vocabulary size.")
    response_format: dict[str, Any] | None = Field(None, description='`{"type": "json_object"}` or `{"type": '
                                                   '"json_schema", "schema": {...}}`: the completion is JSON (of '
                                                   'the schema), by constrained decoding; `{"type": "text"}`: none.')

    @field_validator("logit_bias")
    @classmethod
    def _bias_entries(cls, v: dict[str, float]) -> dict[str, float]:
        for key, bias in v.items():
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f"{key!r} is not a token id (digits)")
            if not -100 <= bias <= 100:
                raise ValueError(f"token {key}: {bias} is outside -100..100")
        return v

    @field_validator("response_format")
    @classmethod
    def _json_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        kind = v.get("type")
        keys = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "schema"}}.get(str(kind))
        if keys is None:
            raise ValueError(f"type must be text, json_object or json_schema, not {kind!r}")
        if set(v) - keys:
            raise ValueError(f"unknown keys for {kind}: {sorted(set(v) - keys)}")
        if kind == "text":
            return None
        if kind == "json_schema" and not isinstance(v.get("schema"), dict):
            raise ValueError("json_schema needs a `schema` object")
        schema = v.get("schema", {"type": "object"})
        try:
            error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema))
        except Exception as e:  # llguidance's words for a schema it cannot read
            error = str(e)
        if error:
            raise ValueError(f"invalid JSON schema: {error}")
        return v

    @field_validator("max_new_tokens")
    @classmethod
    def _zero_only_with_echo(cls, v: int, info: ValidationInfo) -> int:
        if v == 0 and not info.data.get("echo"):
            raise ValueError("0 only with echo (to score the prompt); otherwise at least 1")
        return v

    @model_validator(mode="after")
    def _one_prompt_field(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of prompt or prompts")
        return self

    @property
    def prompt_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class GenerateLogprobs(BaseModel):
    """One entry per token: the prompt's first with echo (the very first has no logprob: None), then the
    generated ones (an end-of-sequence token that ended the output is not one)."""

    tokens: list[str] = Field(description="Each token's text (`decode([id])`, special tokens as their text).")
    token_ids: list[int]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] = Field(
        description="The k likeliest tokens' texts and logprobs at each position ({} when logprobs is 0).")
    text_offset: list[int] = Field(description="Each token's character offset in (the prompt with echo, else "
                                   "nothing) + the generated text.")


class GenerateOutput(BaseModel):
    text: str = Field(description="The completion (never the prompt, echo or not), cut at a stop string.")
    tokens: int = Field(description="Tokens generated.")
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: an end token (end of sequence or the chat template's end of turn) or a stop string; "
                    "length: max_new_tokens reached.")
    prompt_tokens: int = Field(description="Tokens of the prompt this output continued.")
    logprobs: GenerateLogprobs | None = Field(None, description="With `logprobs` in the request.")


class GenerateResponse(BaseModel):
    outputs: list[GenerateOutput]
    adapter: str | None
    base_model: str
    timing: dict[str, float] = Field(
        description="Milliseconds: queue (Celery), load (base model and adapter), ttft (time to first token on "
                    "the worker), generate (first admission to last token), total (as the API saw it).")


class LoadedBase(BaseModel):
    worker: str = Field(description="The generate worker (host and process).")
    base_model: str
    quantization: str
    adapters: list[str] = Field(description="Adapters loaded beside it, least recently used first.")
    adapter_slots: int = Field(description="How many adapters it keeps loaded at most.")


class AdapterList(BaseModel):
    data: list[LoadedBase]


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


# -- uploaded datasets ----------------------------------------------------------------------------

DatasetFormat = Literal["jsonl", "json", "csv", "parquet"]


class Dataset(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    filename: str = Field(description="The uploaded file's name, as given (metadata only).")
    format: DatasetFormat = Field(description="Detected from the file extension; stored as JSONL either way.")
    row_count: int = Field(description="Rows stored (rows with no non-empty value are left out).")
    dropped_rows: int = Field(0, description="Rows left out because every value was empty or null.")
    columns: list[str] = Field(description="Every column name of any row, sorted.")
    bytes: int = Field(description="Size of the uploaded file.")
    created_at: float
    preview: list[dict[str, Any]] = Field(description="The first rows, long strings shortened.")
    tenant: str | None = Field(None, description="The tenant whose API key uploaded it.")


class DatasetList(BaseModel):
    data: list[Dataset]
    has_more: bool
    next_after: str | None = Field(None, description="Pass as `after` for the next page.")


# -- webhooks (app/core/webhooks.py) --------------------------------------------------------------

WebhookId = Annotated[str, Field(pattern=r"^wh_[0-9a-f]{22}$")]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"url": "https://example.com/hooks"}]})
    url: str = Field(max_length=2048, description="Receives the tenant's `fine_tuning.job.*` events: https, "
                     "to a public address (http only to the operator's FTAAS_WEBHOOK_ALLOWED_HOSTS).")


class Webhook(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    created_at: float
    tenant: str = Field(description="The tenant whose jobs' events it receives.")


class WebhookCreated(Webhook):
    secret: str = Field(description="`whsec_…`: verifies the `webhook-signature` header. Shown only here, once.")


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Webhook]
