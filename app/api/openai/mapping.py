"""ftaas records as OpenAI objects and OpenAI requests as ftaas ones (README, "OpenAI-compatible API").

``n_epochs`` → ``max_steps`` = ceil(n_epochs x usable rows / batch_size); ``batch_size`` → micro-batch (its
largest divisor up to 8) x gradient accumulation; ``learning_rate_multiplier`` x 2e-4 → ``learning_rate``; no
validation file → no held-out rows; ``suffix`` → the job's ``name``. A succeeded job's ``fine_tuned_model`` is
``ft:<base>[:<suffix>]:<job id>``; the bare job id names it too.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from app.api.errors import ApiError
from app.api.openai.protocol import AUTO_EPOCHS, BASE_LEARNING_RATE, ORGANIZATION_ID, FineTuningJobCreate
from app.api.schemas import DEFAULT_TEMPLATE, JobCreate
from app.core.formats import detect_format, row_stats

_SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")
M = TypeVar("M", bound=BaseModel)


def build(model: type[M], params: dict[str, str] | None, **fields: Any) -> M:
    """An ftaas request model from mapped OpenAI fields; what does not fit ftaas's bounds is a 400 naming the
    OpenAI field (``params``: ftaas field -> OpenAI field; unmapped ones keep their ftaas name)."""
    try:
        return model(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        param = (params or {}).get(str(first["loc"][0]), where) if first["loc"] else None
        message = str(first["msg"]).removeprefix("Value error, ")
        if param:
            message = f"Invalid value for '{param}': {message} ({where} in ftaas terms)"
        raise ApiError(400, "invalid_request", message, param) from None


def job_create(body: FineTuningJobCreate, rows: list[dict[str, Any]]) -> JobCreate:
    """The ftaas job an OpenAI job body asks for; ``max_steps`` from the training file's usable ``rows``."""
    hp = body.hp
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
    return build(JobCreate, None, base_model=body.model, dataset={"id": body.training_file},
                 validation=validation, hyperparameters=hyper, name=body.suffix, metadata=body.metadata or {})


def fine_tuned_model(job: dict[str, Any]) -> str:
    suffix = job.get("name") or ""
    middle = f"{suffix}:" if _SUFFIX.fullmatch(suffix) else ""
    return f"ft:{job['request']['base_model']}:{middle}{job['id']}"


def file_object(meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": meta["id"], "bytes": meta["bytes"], "created_at": int(meta["created_at"]),
            "filename": meta["filename"]}


def model_object(job: dict[str, Any]) -> dict[str, Any]:
    return {"id": fine_tuned_model(job), "created": int(job["finished_at"] or job["created_at"]),
            "owned_by": ORGANIZATION_ID}


def whole_epochs(hp: dict[str, Any], stats: dict[str, Any]) -> int | None:
    """Whole passes over the training rows that the job's steps make (at least 1). ``job_create`` makes
    ceil(n_epochs x rows / batch_size) steps, a little over n_epochs passes (``dataset_stats.epochs``, e.g.
    1.067, on ``GET /jobs/{id}``): its whole part is the n_epochs asked (or auto's 3) whenever batch_size is
    at most the rows and the step cap was not reached."""
    train = stats.get("train_rows")
    if not train:
        return None
    return max(1, hp["max_steps"] * hp["batch_size"] * hp["gradient_accumulation_steps"] // train)


def training_file(dataset: dict[str, Any]) -> str:
    """The job's training file: the file id, or for a job made by ``POST /jobs``, ``hf:<name>`` or ``inline``."""
    if dataset.get("id"):
        return str(dataset["id"])
    hub = dataset.get("hub")
    return f"hf:{hub['name']}" if isinstance(hub, dict) and hub.get("name") else "inline"


def fine_tuning_job(job: dict[str, Any], trained_tokens: Callable[[str], int | None]) -> dict[str, Any]:
    """A job record as OpenAI's fine-tuning job; ``trained_tokens(job id)`` is asked once it has started."""
    req, status = job["request"], job["status"]
    hp, stats = req["hyperparameters"], job.get("dataset_stats") or {}
    hyper = {"n_epochs": whole_epochs(hp, stats),
             "batch_size": hp["batch_size"] * hp["gradient_accumulation_steps"],
             "learning_rate_multiplier": round(hp["learning_rate"] / BASE_LEARNING_RATE, 6)}
    eta = (job.get("progress") or {}).get("eta_seconds")
    err = job.get("error")
    return {
        "id": job["id"], "model": req["base_model"], "status": status, "created_at": int(job["created_at"]),
        "finished_at": int(job["finished_at"]) if job.get("finished_at") else None,
        "estimated_finish": int(time.time() + eta) if status == "running" and eta is not None else None,
        "fine_tuned_model": fine_tuned_model(job) if status == "succeeded" else None,
        "trained_tokens": trained_tokens(job["id"]) if status != "queued" else None,
        "error": {"code": err["code"], "message": err["message"], "param": None} if err else None,
        "hyperparameters": hyper, "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "seed": int(hp.get("seed") or 0), "training_file": training_file(req["dataset"]),
        "validation_file": ((req.get("validation") or {}).get("dataset") or {}).get("id"),
        "metadata": req.get("metadata") or None,
    }


_MESSAGES: dict[str, Callable[[dict[str, Any]], str]] = {
    "queued": lambda d: "Fine-tuning job queued",
    "started": lambda d: "Fine-tuning job started",
    "dataset_stats": lambda d: f"Training file validated: {d.get('rows_used', '?')} examples",
    "step": lambda d: f"Step {d.get('step')}/{d.get('total_steps')}: training loss={d.get('loss', float('nan')):.4f}",
    "eval": lambda d: f"Step {d.get('step')}: validation loss={d.get('eval_loss', float('nan')):.4f}",
    "phase": lambda d: f"Phase: {str(d.get('phase')).replace('_', ' ')}"
                       + (f" ({d.get('done', 0)}/{d['total']})" if d.get("total") else ""),
    "cancel_requested": lambda d: "Cancellation requested; the job stops at its next step",
    "adapter_saved": lambda d: "Adapter saved",
    "succeeded": lambda d: "The job has successfully completed",
    "failed": lambda d: f"Fine-tuning job failed: {(d.get('error') or {}).get('message', 'unknown error')}",
    "cancelled": lambda d: "Fine-tuning job cancelled",
}


def fine_tuning_event(ev: dict[str, Any]) -> dict[str, Any]:
    kind, data = ev["type"], ev["data"]
    message = _MESSAGES.get(kind, lambda d: kind.replace("_", " ").capitalize())(data)
    if kind == "step" and "loss" in data:
        data = data | {"train_loss": data["loss"]}
    return {"id": f"ftevent-{ev['id']}", "created_at": int(ev["time"]), "message": message, "data": data,
            "level": "error" if kind == "failed" else "warn" if kind.startswith("cancel") else "info",
            "type": "metrics" if kind in ("step", "eval") else "message"}
