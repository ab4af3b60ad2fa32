"""The one Settings object, read from the environment (prefix ``FTAAS_``)."""

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.core.apikeys import ApiKeyEntry
from app.core.ids import hub_repo_id_problem
from app.core.jobs import MAX_INLINE_ROWS, MAX_LENGTH, MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_PROMPTS

#: Built-in base models that work offline (see worker/models.py for how each loads).
BUILTIN_MODELS = ("gemma-3-270m", "tiny-gemma")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FTAAS_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("FTAAS_REDIS_URL", "REDIS_URL"),
        description="Redis for the job store, the Celery broker and its result backend.",
    )
    redis_prefix: str = Field("ftaas", description="Prefix of every Redis key the job store writes.")
    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, validation_alias=AliasChoices("FTAAS_PORT", "PORT"), ge=1, le=65535)

    default_base_model: str = Field(
        "gemma-3-270m", description="Base model when a request names none (google/gemma-2b on GPU)."
    )
    hub_models: list[str] = Field(
        default_factory=lambda: ["google/gemma-2b", "google/gemma-2b-it"],
        description="Hub model ids users may name as base_model (loaded with HF_TOKEN).",
    )
    hf_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("HF_TOKEN", "FTAAS_HF_TOKEN"),
        description="Hub token, from the environment or FTAAS_HF_TOKEN_FILE only; never stored or returned.",
    )
    hf_token_file: Path | None = Field(None, description="A file holding the hub token (e.g. a Docker secret).")

    data_dir: Path = Field(Path("data"), description="Root of the adapter and dataset stores.")
    model_cache_dir: Path = Field(
        Path.home() / ".cache" / "ftaas" / "models",
        description="Where built-in models are converted to safetensors once and reused.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where workers run models.")

    # -- training speed (docs/training-speed.md; worker/train/fast_path.py) ----------------------------
    train_fast_path: bool = Field(
        True, description="Run each step's effective batch as one Trainer batch in token-budgeted pieces "
        "(worker/train/fast_path.py)."
    )
    train_token_budget: int = Field(
        0, ge=0, le=1_048_576, description="Tokens per packed bin (padded tokens per micro-batch without packing); "
        "0: from free GPU memory (CPU: 2048)."
    )
    train_packing: bool = Field(
        True, description="Fast path: pack each step's examples into bins with a block-diagonal causal mask "
        "(no example attends to another) instead of padded micro-batches."
    )
    train_fused_kernels: bool = Field(
        True, description="GPU fast path: Gemma's RMSNorms through PyTorch's fused kernel, LoRA's B matmul, "
        "scaling and residual add as one addmm (worker/train/fused.py)."
    )
    train_cuda_graphs: bool = Field(
        True, description="Fast path with packing on CUDA, no gradient checkpointing: capture each bin size's "
        "forward + backward as a CUDA graph once and replay it (worker/train/cuda_graphs.py)."
    )
    train_memory_gib: float = Field(20.0, gt=0, description="GPU memory the token budget may plan for.")
    train_dequantize: bool = Field(
        True, description="GPU: dequantize the NF4 base to bf16 once (bnb's values) instead of on every matmul."
    )
    train_compile_min_examples: int = Field(
        0, ge=0, description="GPU fast path without checkpointing: torch.compile each decoder layer for jobs that "
        "train at least this many examples (max_steps x effective batch); 0: never. Off by default: compiling took "
        "over 45 s on an H200 and losses drift from eager's once LoRA is non-zero (bench/RESULTS.md run T4)."
    )

    generate_timeout_s: float = Field(120.0, gt=0, description="How long /generate waits for a worker.")
    adapter_cache_size: int = Field(8, ge=1, description="Adapters kept loaded per generate worker (LRU).")
    base_cache_size: int = Field(2, ge=1, description="Base models kept loaded per generate worker (LRU).")
    # -- serving (docs/serving.md; worker/serve/engine.py) ------------------------------------------
    adapter_cache_mb: float = Field(1024.0, gt=0, description="Device memory for adapter slots per base model; "
                                    "with adapter_cache_size it bounds how many adapters stay loaded.")
    serve_lora_max_rank: int = Field(16, ge=1, le=256, description="Largest LoRA rank the generate worker serves.")
    serve_max_batch: int = Field(64, ge=1, le=512, description="Rows decoded together (CPU: at most 8).")
    serve_max_len: int = Field(2048, ge=64, description="Prompt + new tokens per row (the KV cache length).")
    serve_weights: Literal["auto", "nf4", "bf16"] = Field(
        "auto", description="Serve NF4 bases as is or dequantized once to bf16 (auto: bf16 on CUDA).")
    serve_cuda_graphs: bool = Field(True, description="Capture the decode step as CUDA graphs (CUDA only).")
    readiness_timeout_s: float = Field(1.0, gt=0, description="How long /readyz waits for workers.")
    max_upload_bytes: int = Field(100 * 1024 * 1024, ge=1, description="Largest dataset file POST /datasets takes.")

    # -- reliability (docs/reliability.md; app/core/lease.py) ------------------------------------
    lease_ttl_s: float = Field(30.0, gt=0, description="A running job's lease; lost after this without a heartbeat.")
    heartbeat_interval_s: float = Field(10.0, gt=0, description="How often the training worker renews its lease.")
    reaper_interval_s: float = Field(10.0, gt=0, description="How often workers and the API look for lost jobs.")
    max_attempts: int = Field(3, ge=1, description="Starts a job gets before a lost worker fails it (worker_lost).")
    checkpoint_interval: int = Field(
        50, ge=0, description="Steps between training checkpoints (0: only when the worker is stopped).")
    train_memory_limit_mb: int | None = Field(
        None, ge=64, description="Cap on a training process's memory (RLIMIT_DATA): over it the job fails "
        "with out_of_memory instead of the machine swapping or the kernel killing the worker.")

    # -- security and limits (docs/security.md; app/api/auth.py, app/api/limits.py) ----------
    # The request bounds default to the job contract's (app/core/jobs.py), which a deployment may only lower.
    api_keys: list[ApiKeyEntry] = Field(
        default_factory=list, description="API keys as a JSON list of {sha256, tenant, admin}; none: open."
    )
    api_keys_file: Path | None = Field(
        None, description="A file of API keys: a JSON list like api_keys, or lines '<sha256> <tenant> [admin]'."
    )
    allow_open: bool = Field(False, description="Serve with no API keys on a non-loopback address anyway.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest JSON request body (413).")
    max_inline_rows: int = Field(MAX_INLINE_ROWS, ge=1, le=MAX_INLINE_ROWS,
                                 description="Most rows in dataset.rows (and validation rows).")
    max_step_examples: int = Field(
        1_000_000, ge=1, description="Most max_steps x batch_size x gradient_accumulation_steps of a job."
    )
    max_length: int = Field(MAX_LENGTH, ge=16, le=MAX_LENGTH, description="Largest hyperparameters.max_length.")
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS,
                                description="Largest max_new_tokens of a generate request.")
    max_prompt_chars: int = Field(MAX_PROMPT_CHARS, ge=1, le=MAX_PROMPT_CHARS,
                                  description="Longest prompt of a generate request, in characters.")
    max_prompts: int = Field(MAX_PROMPTS, ge=1, le=MAX_PROMPTS,
                             description="Most rows (prompts x n) in one generate request.")
    generate_max_n: int = Field(8, ge=1, le=MAX_PROMPTS, description="Largest n (completions per prompt) of a "
                                "generate request.")
    max_active_jobs: int = Field(8, ge=1, description="Queued + running jobs a tenant may have at once (429).")
    generate_rate: int = Field(120, ge=1, description="Generate requests a tenant may make per rate window (429).")
    generate_rate_window_s: int = Field(60, ge=1, description="The generate rate's fixed window, in seconds.")

    # -- webhooks (docs/api.md#webhooks; app/core/webhooks.py) ---------------------------------------
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts webhooks may reach over http and whatever they resolve to "
        "(comma-separated or a JSON list; e.g. 127.0.0.1 for tests); others need https and a public address.")
    webhook_timeout_s: float = Field(5.0, gt=0, le=60, description="How long one webhook attempt may take.")
    webhook_max_attempts: int = Field(8, ge=1, le=50, description="Attempts per webhook event before giving up.")
    webhook_backoff_s: float = Field(5.0, gt=0, description="Wait before the second attempt; doubled each time.")
    webhook_backoff_max_s: float = Field(3600.0, gt=0, description="Longest wait between two attempts.")
    webhook_poll_interval_s: float = Field(1.0, gt=0, le=60, description="How often the API looks for due "
                                           "webhook deliveries.")
    webhook_concurrency: int = Field(4, ge=1, le=64, description="Webhook deliveries sent at once per API process.")
    webhook_max_per_tenant: int = Field(10, ge=1, description="Webhook endpoints a tenant may register.")

    @model_validator(mode="after")
    def _token_from_file(self) -> Self:
        """The hub token from ``hf_token_file`` when the environment has none."""
        if self.hf_token is None and self.hf_token_file is not None:
            try:
                token = self.hf_token_file.read_text().strip()
            except OSError as e:
                raise ValueError(f"cannot read FTAAS_HF_TOKEN_FILE {self.hf_token_file}: {e.strerror}") from None
            self.hf_token = SecretStr(token) if token else None
        return self

    @property
    def adapter_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def dataset_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def checkpoint_dir(self) -> Path:
        """``<dir>/<job id>/checkpoint-<step>``: kept while a job may resume, deleted when it ends."""
        return self.data_dir / "checkpoints"

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Self:
        if self.heartbeat_interval_s * 2 > self.lease_ttl_s:
            raise ValueError("FTAAS_HEARTBEAT_INTERVAL_S must be at most half of FTAAS_LEASE_TTL_S")
        return self

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: object) -> object:
        """``a,b`` or a JSON list, from the environment."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [h.strip() for h in text.split(",") if h.strip()]
        return value

    @field_validator("hub_models")
    @classmethod
    def _hub_ids(cls, names: list[str]) -> list[str]:
        """Only ``namespace/name`` hub ids: a bare word could be a local folder or a built-in's name."""
        for name in names:
            problem = hub_repo_id_problem(name)
            if problem:
                raise ValueError(f"FTAAS_HUB_MODELS entry {name!r} {problem}")
        return names

    @property
    def known_models(self) -> list[str]:
        return [*BUILTIN_MODELS, *self.hub_models]


@lru_cache
def get_settings() -> Settings:
    return Settings()
