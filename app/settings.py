"""The one Settings object, read from the environment (prefix ``FTAAS_``)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
        description="Hub token, from the environment only; never stored or returned.",
    )

    data_dir: Path = Field(Path("data"), description="Root of the adapter and dataset stores.")
    model_cache_dir: Path = Field(
        Path.home() / ".cache" / "ftaas" / "models",
        description="Where built-in models are converted to safetensors once and reused.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where workers run models.")

    generate_timeout_s: float = Field(120.0, gt=0, description="How long /generate waits for a worker.")
    adapter_cache_size: int = Field(8, ge=1, description="Adapters kept loaded per generate worker (LRU).")
    base_cache_size: int = Field(2, ge=1, description="Base models kept loaded per generate worker (LRU).")
    readiness_timeout_s: float = Field(1.0, gt=0, description="How long /readyz waits for workers.")
    max_upload_bytes: int = Field(100 * 1024 * 1024, ge=1, description="Largest dataset file POST /datasets takes.")

    @property
    def adapter_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def dataset_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def known_models(self) -> list[str]:
        return [*BUILTIN_MODELS, *self.hub_models]


@lru_cache
def get_settings() -> Settings:
    return Settings()
