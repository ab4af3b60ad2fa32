"""Every request and response body of the API, with the bounds users see in OpenAPI."""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
TargetModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_PROJECTIONS: list[TargetModule] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_TEMPLATE = "Quote: {quote}\nAuthor: {author}"
MAX_INLINE_ROWS = 10_000
MAX_PROMPT_CHARS = 4_000
MAX_PROMPTS = 16
MAX_NEW_TOKENS = 1_024

ShortStr = Annotated[str, StringConstraints(max_length=200)]
CellValue = Annotated[str, StringConstraints(max_length=20_000)] | int | float | bool | None
Row = Annotated[dict[Annotated[str, StringConstraints(min_length=1, max_length=100)], CellValue], Field(max_length=64)]
HubId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$", max_length=200)]
Key = Annotated[str, StringConstraints(max_length=64)]
MetaValue = Annotated[str, StringConstraints(max_length=512)]
JobId = Annotated[str, StringConstraints(pattern=r"^job_[0-9a-f]{22}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def template_fields(template: str) -> list[str]:
    """Field names a ``str.format`` template uses; only plain identifiers are allowed."""
    names: list[str] = []
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(f"template field {{{name}}} must be a plain column name like {{quote}}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("template must name at least one column, like {quote}")
    return names


class HubDataset(Strict):
    name: HubId = Field(description="Hub dataset id, e.g. Abirate/english_quotes.")
    split: ShortStr = Field("train", description="Split to train on.")
    revision: ShortStr | None = Field(None, description="Git revision (branch, tag or commit).")


class DatasetSpec(Strict):
    """Exactly one source. New sources (e.g. an uploaded dataset ``id``) are added as new keys."""

    rows: list[Row] | None = Field(
        None, min_length=1, max_length=MAX_INLINE_ROWS, description="Inline rows (objects of column -> value)."
    )
    hub: HubDataset | None = Field(None, description="A dataset on the hub, loaded by the worker.")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.rows is None) == (self.hub is None):
            raise ValueError("give exactly one of dataset.rows or dataset.hub")
        return self


class LoraSpec(Strict):
    r: int = Field(8, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(8, ge=1, le=1024, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, le=0.5, description="LoRA dropout.")
    target_modules: list[TargetModule] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS),
        min_length=1,
        max_length=7,
        description="Projections that get adapters.",
    )


class Hyperparameters(Strict):
    max_steps: int = Field(100, ge=1, le=10_000, description="Optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, le=1e-2, description="Peak learning rate.")
    warmup_steps: int = Field(2, ge=0, le=10_000, description="Linear warm-up steps.")
    batch_size: int = Field(1, ge=1, le=256, description="Examples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(4, ge=1, le=256, description="Micro-batches per optimizer step.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Random seed; chosen and recorded when absent.")
    max_length: int = Field(1024, ge=16, le=8192, description="Tokens per example; longer ones are truncated.")
    gradient_checkpointing: bool = Field(True, description="Trade compute for memory (the notebook's default).")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantization: Literal["nf4", "none"] = Field("nf4", description="Base weights in 4-bit NF4, or unquantized.")


class JobCreate(Strict):
    base_model: HubId | None = Field(None, description="A built-in name or an allowed hub id; default from settings.")
    dataset: DatasetSpec
    template: str = Field(
        DEFAULT_TEMPLATE, min_length=1, max_length=4_000, description="str.format template over the row's columns."
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    name: ShortStr | None = Field(None, description="A label for the job.")
    metadata: dict[Key, MetaValue] = Field(
        default_factory=dict, max_length=16, description="Up to 16 string pairs, stored with the job."
    )

    @field_validator("template")
    @classmethod
    def _template_parses(cls, v: str) -> str:
        try:
            template_fields(v)
        except ValueError as e:
            raise ValueError(str(e)) from None
        return v


class Progress(BaseModel):
    step: int = 0
    total_steps: int
    fraction: float = 0.0
    eta_seconds: float | None = None


class Metrics(BaseModel):
    loss: float | None = None
    learning_rate: float | None = None
    epoch: float | None = None
    grad_norm: float | None = None


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


class JobList(BaseModel):
    data: list[Job]
    has_more: bool
    next_after: str | None = Field(None, description="Pass as `after` for the next page.")


class GenerateRequest(Strict):
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None
    prompts: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]] | None
    ) = Field(None, min_length=1, max_length=MAX_PROMPTS)
    adapter: JobId | None = Field(None, description="A succeeded job's id; absent: the base model.")
    base_model: HubId | None = Field(None, description="Base model when no adapter is given; default from settings.")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, le=5.0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    top_k: int = Field(50, ge=0, le=1_000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=8, description="Generation ends at the first of these strings."
    )

    @model_validator(mode="after")
    def _one_prompt_field(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of prompt or prompts")
        return self

    @property
    def prompt_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class GenerateOutput(BaseModel):
    text: str
    tokens: int
    finish_reason: Literal["stop", "length"]


class GenerateResponse(BaseModel):
    outputs: list[GenerateOutput]
    adapter: str | None
    base_model: str
    timing: dict[str, float] = Field(description="Milliseconds: queue, load, generate, total.")


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
