"""The inference engine alone (no Celery): adapter LRU, base output untouched, stop strings."""

from __future__ import annotations

from typing import Any

import pytest

from app.core.errors import UserFacingError
from app.core.jobs import JobCreate, JobSpec
from app.core.settings import Settings
from worker.serve.pool import EnginePool
from worker.train.recipe import train


class _Quiet:
    def progress(self, *args: Any) -> None: ...
    def evaluated(self, *args: Any) -> None: ...
    def event(self, *args: Any) -> None: ...
    def phase(self, *args: Any) -> None: ...
    def should_stop(self) -> bool:
        return False


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, quotes: list[dict[str, Any]]) -> tuple[Settings, list[str]]:
    root = tmp_path_factory.mktemp("engine")
    settings = Settings(data_dir=root, device="cpu", adapter_cache_size=1)
    names = []
    for i, lr in enumerate((5e-3, 1e-2)):
        payload = JobSpec.from_request(JobCreate.model_validate({
            "base_model": "tiny-gemma", "dataset": {"rows": quotes[i * 8:(i + 1) * 8]},
            "hyperparameters": {"max_steps": 10, "batch_size": 4, "gradient_accumulation_steps": 1,
                                "learning_rate": lr, "max_length": 64, "gradient_checkpointing": False,
                                "seed": i, "lora": {"r": 8, "alpha": 64}}}), "tiny-gemma", default_seed=0)
        name = f"job_{i:022x}"
        train(payload, settings.adapter_dir / name, _Quiet(), settings)
        names.append(name)
    return settings, names


def _req(adapter: str | None, **kw: Any) -> dict[str, Any]:
    return {"prompts": ["Quote: Life is", "Quote: Be"], "base_model": "tiny-gemma", "quantization": "nf4",
            "adapter": adapter, "max_new_tokens": 8, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
            "top_k": 50, "seed": None, "stop": []} | kw


def _texts(result: dict[str, Any]) -> list[str]:
    return [o["text"] for o in result["outputs"]]


def test_lru_evicts_and_reloads_with_identical_output(adapters: tuple[Settings, list[str]]) -> None:
    settings, (a, b) = adapters
    engine = EnginePool(settings)
    base = _texts(engine.generate(_req(None)))
    first_a = _texts(engine.generate(_req(a)))
    first_b = _texts(engine.generate(_req(b)))
    assert engine.loaded() == {"tiny-gemma:nf4": [b]}, "cache size 1 keeps only the latest adapter"
    assert first_a != base and first_b != first_a, "adapters must change the greedy output"
    assert _texts(engine.generate(_req(a))) == first_a, "a reloaded adapter gives the same output"
    assert _texts(engine.generate(_req(None))) == base, "loading adapters leaves the base output alone"


def test_stop_string_cuts_the_text(adapters: tuple[Settings, list[str]]) -> None:
    settings, _ = adapters
    engine = EnginePool(settings)
    full = engine.generate(_req(None, prompts=["Quote: Life is"], max_new_tokens=12))["outputs"][0]
    assert full["finish_reason"] == "length" and len(full["text"]) > 4
    stop = full["text"][len(full["text"]) // 2:][:3]
    cut = engine.generate(_req(None, prompts=["Quote: Life is"], max_new_tokens=12, stop=[stop]))["outputs"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full["text"][: full["text"].index(stop)]


def test_missing_adapter_files_is_a_user_error(adapters: tuple[Settings, list[str]]) -> None:
    settings, _ = adapters
    with pytest.raises(UserFacingError) as e:
        EnginePool(settings).generate(_req("job_" + "f" * 22))
    assert e.value.code == "adapter_not_found"
