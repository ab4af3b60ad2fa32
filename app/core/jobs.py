"""The job contract: what a job request holds (the bodies of ``POST /jobs``, with the bounds users see in
OpenAPI), shared by the API, which validates it, and the workers, which read it back.

``JobCreate`` is what a user sends. ``JobSpec`` is what the API accepted and stored in Redis (the request plus
its resolved base model, whether it set its template, its seed); a worker reads it back with ``JobSpec.read``.
``GenerateTask`` is one generate request as the API sends it to a generate worker.
"""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from app.core.errors import UserFacingError
from app.core.ids import DATASET_ID, GEN_ID, JOB_ID, MODEL_NAME, hub_repo_id_problem, revision_problem

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
#: What a job is doing, in the order a job does it (``queued`` before a worker has it; worker/train/phases.py).
JobPhase = Literal["queued", "preparing_data", "loading_model", "evaluating_before", "sampling_before", "training",
                   "evaluating_after", "sampling_after", "saving"]
PHASES: tuple[JobPhase, ...] = get_args(JobPhase)
TargetModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_PROJECTIONS: list[TargetModule] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_TEMPLATE = "Quote: {quote}\nAuthor: {author}"
MAX_INLINE_ROWS = 10_000
MAX_PROMPT_CHARS = 4_000
MAX_PROMPTS = 16
MAX_NEW_TOKENS = 1_024
MAX_LENGTH = 8_192
#: The version of ``JobSpec`` this code writes and reads; a stored spec without one is version 1.
SPEC_VERSION = 1
#: The version of ``GenerateTask`` messages this code sends and reads.
TASK_VERSION = 1

ShortStr = Annotated[str, StringConstraints(max_length=200)]
#: A user's label: printable, no control characters (it is shown in tables and logs, never used as a path).
Label = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
Text = Annotated[str, StringConstraints(max_length=20_000)]


class ChatMessage(BaseModel):
    """One turn of a ``messages`` column (OpenAI chat style)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text


CellValue = Text | int | float | bool | None | Annotated[list[ChatMessage], Field(max_length=64)]
Row = Annotated[dict[Annotated[str, StringConstraints(min_length=1, max_length=100)], CellValue], Field(max_length=64)]
#: A base model's name (built-in or hub id); the API and the worker load only names listed in settings.
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME.pattern, max_length=200)]


def _checked(problem: Any) -> Any:
    def check(value: str) -> str:
        why = problem(value)
        if why:
            raise ValueError(why)
        return value
    return AfterValidator(check)


#: A hub dataset: ``namespace/name`` only, never a path, builder, URL or glob (app/core/ids.py says why).
HubDatasetId = Annotated[str, StringConstraints(max_length=200), _checked(hub_repo_id_problem)]
Revision = Annotated[str, StringConstraints(max_length=200), _checked(revision_problem)]
Key = Annotated[str, StringConstraints(max_length=64)]
MetaValue = Annotated[str, StringConstraints(max_length=512)]
JobId = Annotated[str, StringConstraints(pattern=JOB_ID.pattern)]
DatasetId = Annotated[str, StringConstraints(pattern=DATASET_ID.pattern)]


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
    name: HubDatasetId = Field(description="Hub dataset id, namespace/name, e.g. Abirate/english_quotes.")
    split: Annotated[str, StringConstraints(max_length=200, pattern=r"^[\w.\-\[\]:%+]+$")] = Field(
        "train", description="Split to train on (datasets' split syntax, e.g. train or train[:90%]).")
    revision: Revision | None = Field(None, description="Git revision (branch, tag or commit).")


class DatasetSpec(Strict):
    """Exactly one source. New sources are added as new keys."""

    rows: list[Row] | None = Field(
        None, min_length=1, max_length=MAX_INLINE_ROWS, description="Inline rows (objects of column -> value)."
    )
    hub: HubDataset | None = Field(None, description="A dataset on the hub, loaded by the worker.")
    id: DatasetId | None = Field(None, description="An uploaded dataset (POST /datasets).")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if sum(source is not None for source in (self.rows, self.hub, self.id)) != 1:
            raise ValueError("give exactly one of dataset.rows, dataset.hub or dataset.id")
        return self

    def plain_rows(self) -> list[dict[str, Any]]:
        """The inline rows as plain JSON values (chat messages as dicts), as the row checks and trainer read them."""
        return list(self.model_dump(include={"rows"})["rows"] or [])


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
    # Defaults: the notebook's recipe (100 steps x 1 x 4 = 400 examples, lr 2e-4). Larger effective batches run
    # far faster on a GPU (docs/training-speed.md), but the learning rate that keeps quality at that batch is not
    # measured yet (bench/quality_parity.py), so the defaults stay the notebook's.
    max_steps: int = Field(100, ge=1, le=10_000, description="Optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, le=1e-2, description="Peak learning rate.")
    warmup_steps: int = Field(2, ge=0, le=10_000, description="Linear warm-up steps.")
    batch_size: int = Field(
        1, ge=1, le=256, description="Examples per micro-batch; one step trains batch_size x "
        "gradient_accumulation_steps examples (the fast path regroups them by a token budget, same examples).")
    gradient_accumulation_steps: int = Field(4, ge=1, le=256, description="Micro-batches per optimizer step.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Random seed; chosen and recorded when absent.")
    max_length: int = Field(1024, ge=16, le=MAX_LENGTH, description="Tokens per example; longer ones are truncated.")
    gradient_checkpointing: bool = Field(
        False, description="Trade compute for memory (the notebook's default was true; the token budget plans for it).")
    eval_interval: int | None = Field(
        None, ge=1, le=10_000, description="Steps between eval-loss measurements; default: max_steps / 5."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantization: Literal["nf4", "none"] = Field("nf4", description="Base weights in 4-bit NF4, or unquantized.")

    @property
    def examples_per_step(self) -> int:
        """Examples one optimizer step trains on (the effective batch)."""
        return self.batch_size * self.gradient_accumulation_steps


class ValidationSpec(Strict):
    """Held-out rows for eval loss: a seeded fraction of the dataset, or a separate dataset."""

    fraction: float | None = Field(None, ge=0.0, le=0.5, description="Share held out (0 = no validation).")
    dataset: DatasetSpec | None = Field(None, description="A separate validation dataset.")

    @model_validator(mode="after")
    def _one(self) -> ValidationSpec:
        if (self.fraction is None) == (self.dataset is None):
            raise ValueError("give exactly one of validation.fraction or validation.dataset")
        return self


class JobCreate(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"dataset": {"rows": [{"quote": "Be yourself.", "author": "Oscar Wilde"}]},
         "hyperparameters": {"max_steps": 1}},
    ]})
    base_model: ModelName | None = Field(
        None, description="A built-in name or an allowed hub id; default from settings.")
    dataset: DatasetSpec
    template: str = Field(
        DEFAULT_TEMPLATE, min_length=1, max_length=4_000, description="str.format template over the row's columns."
    )
    format: Literal["auto", "template", "text", "prompt_completion", "messages"] = Field(
        "auto",
        description="How rows become training examples; auto: messages > prompt/completion > text > template.",
    )
    validation: ValidationSpec | None = Field(
        None, description="Default: 10% held out when the dataset has at least 50 rows, none below that."
    )
    sample_prompts: list[Annotated[str, StringConstraints(min_length=1, max_length=500)]] | None = Field(
        None, max_length=8,
        description="Prompts generated from before and after training; default: a few rows' first words.",
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    name: Label | None = Field(None, description="A label for the job (no control characters).")
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


class SpecHyperparameters(Hyperparameters):
    seed: int = Field(ge=0, le=2**31 - 1, description="Random seed (chosen by the API when the request had none).")


class JobSpec(JobCreate):
    """An accepted job as stored in Redis and read by the worker: the request, its base model resolved, whether
    the user set ``template`` (``format: auto`` then means the template format) and a seed always set.
    Stored as JSON with the request's keys plus these, so what the API wrote before ``spec_version`` reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    spec_version: int = Field(SPEC_VERSION, description="The contract's version; absent in records before it: 1.")
    base_model: ModelName  # type: ignore[assignment]  # resolved: never None here
    template_given: bool = False
    hyperparameters: SpecHyperparameters  # type: ignore[assignment]

    @classmethod
    def from_request(cls, body: JobCreate, base_model: str, default_seed: int) -> JobSpec:
        """The spec of an accepted request on ``base_model``; ``default_seed`` when the request has no seed."""
        hp = body.hyperparameters
        return cls.model_validate(body.model_dump() | {
            "base_model": base_model, "template_given": "template" in body.model_fields_set,
            "hyperparameters": hp.model_dump() | {"seed": default_seed if hp.seed is None else hp.seed}})

    @classmethod
    def read(cls, stored: dict[str, Any]) -> JobSpec:
        """A stored spec, or a ``UserFacingError`` that fails the job when this code cannot read it."""
        return _read_versioned(cls, stored, stored.get("spec_version", 1), SPEC_VERSION, "the job's stored request",
                               "unsupported_spec", "invalid_spec")

    def public(self) -> dict[str, Any]:
        """The request as the job record shows it: inline rows summarised by their count."""
        out = self.model_dump(mode="json", exclude={"template_given", "spec_version"})
        out["dataset"] = _summary(out["dataset"])
        if out.get("validation") and out["validation"].get("dataset"):
            out["validation"] = {"dataset": _summary(out["validation"]["dataset"])}
        return out

    def uploads(self) -> list[tuple[str, str]]:
        """(field, id) of each uploaded dataset the job reads: ``dataset.id``, ``validation.dataset.id``."""
        val = self.validation.dataset if self.validation else None
        return [(f, i) for f, i in (("dataset.id", self.dataset.id), ("validation.dataset.id", val.id if val else None))
                if i is not None]


def _summary(dataset: dict[str, Any]) -> dict[str, Any]:
    if dataset.get("rows") is not None:
        return {"rows": {"count": len(dataset["rows"])}}
    return {k: v for k, v in dataset.items() if v is not None}


class GenerateTask(BaseModel):
    """One generate request as the API sends it to a generate worker, as one JSON argument: the request's
    fields with the base model and quantization resolved, the Redis stream the worker answers on
    (``gen_id``), whether it also streams the text as it is generated, and when it was enqueued."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    task_version: int = Field(TASK_VERSION, description="The message's version; a worker answers another one "
                              "with ``unsupported_task`` at once.")
    gen_id: Annotated[str, StringConstraints(pattern=GEN_ID.pattern)]
    stream: bool = Field(description="Also send each new piece of text (``token`` events), not only the end.")
    enqueued_at: float = Field(description="time.time() when the API enqueued it (the queue time is measured).")
    prompts: list[str] = Field(min_length=1)
    adapter: JobId | None
    base_model: ModelName
    quantization: Literal["nf4", "none"]
    max_new_tokens: int = Field(ge=0, description="0 only with echo (the prompt's logprobs alone).")
    do_sample: bool
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1.0)
    top_k: int = Field(ge=0)
    seed: int | None
    stop: list[str]
    # added after TASK_VERSION 1 with defaults, so the messages of before still read
    n: int = Field(1, ge=1, description="Completions per prompt: rows i * n + j; row j samples with seed + j.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Each token's logprob and its k likeliest.")
    echo: bool = Field(False, description="Also the prompt's tokens' logprobs.")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] = Field(default_factory=dict, max_length=300, description="Token id -> bias.")
    response_format: dict[str, Any] | None = Field(None, description="json_object / json_schema (checked by the "
                                                   "API); the worker compiles its grammar.")

    @model_validator(mode="after")
    def _tokens_or_echo(self) -> GenerateTask:
        if self.max_new_tokens == 0 and not self.echo:
            raise ValueError("max_new_tokens may be 0 only with echo")
        return self

    def engine_request(self) -> dict[str, Any]:
        """The request dict the serving engine takes (worker/serve/pool.py ``submit``)."""
        return self.model_dump(exclude={"task_version", "gen_id", "stream", "enqueued_at"})

    @classmethod
    def read(cls, stored: Any, *legacy: Any) -> GenerateTask:
        """The task from its message; ``UserFacingError`` for one this code does not read: another version, or
        the positional arguments ``(request, enqueued_at, gen_id, pieces)`` releases before this one sent."""
        version = stored.get("task_version", 1) if isinstance(stored, dict) and not legacy else "legacy"
        return _read_versioned(cls, stored, version, TASK_VERSION, "the generate message", "unsupported_task",
                               "unsupported_task")

    @staticmethod
    def stream_of(stored: Any, *legacy: Any) -> str | None:
        """The Redis stream a message (of any release) asks to be answered on, when it names a valid one."""
        gen_id = legacy[1] if len(legacy) >= 2 else stored.get("gen_id") if isinstance(stored, dict) else None
        return gen_id if isinstance(gen_id, str) and GEN_ID.fullmatch(gen_id) else None


_Versioned = TypeVar("_Versioned", bound=BaseModel)


def _read_versioned(model: type[_Versioned], stored: Any, version: Any, current: int, what: str, other_version: str,
                    unreadable: str) -> _Versioned:
    """``stored`` as ``model`` when it is of this code's ``current`` version and parses; otherwise a
    ``UserFacingError`` whose code names why (``other_version`` or ``unreadable``), for a rolling deploy."""
    if version != current:
        raise UserFacingError(other_version, f"{what} is version {version!r}; this worker reads version {current}: "
                              "the API and the workers run different releases")
    try:
        return model.model_validate(stored)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise UserFacingError(unreadable, f"{what} does not read: {where}: {first['msg']}") from None
