"""FastAPI dependencies shared by the routers: the settings and the stores, over one Redis pool."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from fastapi import Depends

from app.core.settings import Settings, get_settings
from app.core.store import DatasetStore, GenerationStore, JobStore, redis_client


@lru_cache
def job_store() -> JobStore:
    s = get_settings()
    return JobStore(redis_client(s.redis_url), s.redis_prefix)


@lru_cache
def dataset_store() -> DatasetStore:
    s = get_settings()
    return DatasetStore(job_store().r, s.redis_prefix)


@lru_cache
def generation_store() -> GenerationStore:
    return GenerationStore(job_store().r, get_settings().redis_prefix)


Store = Annotated[JobStore, Depends(job_store)]
Datasets = Annotated[DatasetStore, Depends(dataset_store)]
Generations = Annotated[GenerationStore, Depends(generation_store)]
Config = Annotated[Settings, Depends(get_settings)]
