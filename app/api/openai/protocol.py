"""Request and response bodies of the OpenAI-compatible fine-tuning, file and model routes (``/v1``), with the
bounds ftaas enforces; the completion requests are in app/api/openai/params.py.

Requests are strict: a field the official client sends but ftaas cannot honour is rejected with a
400 naming it, rather than silently ignored (``integrations`` is the exception: it names a tracker ftaas
does not report to, and training is the same without it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from app.api.schemas import Key, MetaValue

#: The learning rate a ``learning_rate_multiplier`` of 1 means (ftaas's and the notebook's default).
BASE_LEARNING_RATE = 2e-4
#: Epochs when ``n_epochs`` is ``auto``.
AUTO_EPOCHS = 3
ORGANIZATION_ID = "org-ftaas"

Auto = Literal["auto"]
#: A file or job id as given: checked against ftaas's id format by the route, so a bad one is a 404
#: "No such file" as OpenAI answers, not a pattern error.
GivenId = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- fine-tuning jobs -------------------------------------------------------------------------------

class FtHyperparameters(Strict):
    n_epochs: int | Auto = Field("auto", description=f"Passes over the training file; auto: {AUTO_EPOCHS}.")
    batch_size: int | Auto = Field("auto", description="Examples per optimizer step; auto: ftaas's 1 x 4.")
    learning_rate_multiplier: float | Auto = Field(
        "auto", description=f"Times {BASE_LEARNING_RATE:g}, ftaas's default learning rate; auto: 1.")

    @model_validator(mode="after")
    def _bounds(self) -> FtHyperparameters:
        if self.n_epochs != "auto" and not 1 <= self.n_epochs <= 50:
            raise ValueError("n_epochs must be from 1 to 50")
        if self.batch_size != "auto" and not 1 <= self.batch_size <= 256:
            raise ValueError("batch_size must be from 1 to 256")
        lrm = self.learning_rate_multiplier
        if lrm != "auto" and not 0 < lrm <= 50:
            raise ValueError("learning_rate_multiplier must be above 0 and at most 50")
        return self


class SupervisedMethod(Strict):
    hyperparameters: FtHyperparameters | None = None


class FtMethod(Strict):
    type: Literal["supervised"] = Field(description="Only supervised fine-tuning (LoRA SFT) is offered.")
    supervised: SupervisedMethod | None = None


class Integration(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["wandb"]
    wandb: dict[str, Any]


class FineTuningJobCreate(Strict):
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="A base model ftaas knows (GET /v1/models).")
    training_file: GivenId = Field(description="A file id from POST /v1/files.")
    validation_file: GivenId | None = Field(None, description="A second file, for eval loss.")
    hyperparameters: FtHyperparameters | None = None
    method: FtMethod | None = None
    suffix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")] | None = Field(
        None, description="Part of the fine-tuned model's name: ft:<model>:<suffix>:<job id>.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[Key, MetaValue] | None = Field(None, max_length=16)
    integrations: list[Integration] | None = Field(
        None, max_length=16, description="Accepted and ignored: ftaas reports to no tracker (the job's events "
        "and GET /jobs/{id}/metrics have the figures).")

    @property
    def hp(self) -> FtHyperparameters:
        if self.method and self.method.supervised and self.method.supervised.hyperparameters:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or FtHyperparameters()


class FtError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FtHyperparametersOut(BaseModel):
    n_epochs: int | None = Field(None, description="Whole passes over the training rows that the job's steps make.")
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    created_at: int
    finished_at: int | None = None
    estimated_finish: int | None = None
    fine_tuned_model: str | None = Field(None, description="ft:<base>[:<suffix>]:<job id>, once succeeded.")
    trained_tokens: int | None = Field(None, description="Tokens seen by training, from the metric series.")
    error: FtError | None = None
    hyperparameters: FtHyperparametersOut
    method: dict[str, Any] | None = None
    organization_id: str = ORGANIZATION_ID
    result_files: list[str] = Field(default_factory=list)
    seed: int
    training_file: str = Field(description="The file id; a job made by POST /jobs: `inline` or `hf:<name>`.")
    validation_file: str | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class CheckpointList(BaseModel):
    """Empty until ftaas keeps a fine-tuning job's intermediate checkpoints as models."""
    object: Literal["list"] = "list"
    data: list[dict[str, Any]] = Field(default_factory=list)
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
    type: Literal["message", "metrics"]


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


# -- files and models -------------------------------------------------------------------------------

class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune"] = "fine-tune"
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
