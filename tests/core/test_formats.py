"""Training formats on tiny-gemma, through the plain trainer: the collated label masks cover only the
completion (prompt/completion) or the assistant turns (messages); dataset stats and the split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.core.jobs import JobCreate, JobSpec
from app.core.settings import Settings
from tests.train.test_recipe import Recorder
from worker.train.recipe import build_trainer

PC_ROWS = [{"prompt": f"Q: what is {i} plus {i}? A:", "completion": f" {2 * i}"} for i in range(12)]
CHAT_ROWS = [{"messages": [{"role": "user", "content": f"Say the number {i}."},
                           {"role": "assistant", "content": f"The number is {i}."},
                           {"role": "user", "content": "Again, louder."},
                           {"role": "assistant", "content": f"THE NUMBER IS {i}!"}]} for i in range(12)]


def _payload(rows: list[dict[str, Any]], **extra: Any) -> JobSpec:
    body = JobCreate.model_validate({"base_model": "tiny-gemma", "dataset": {"rows": rows}, "hyperparameters": {
        "max_steps": 2, "batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 96,
        "gradient_checkpointing": False, "seed": 5}} | extra)
    return JobSpec.from_request(body, "tiny-gemma", default_seed=0)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, device="cpu")


def _trained_text(trainer: Any, n: int = 4) -> tuple[list[str], list[str]]:
    """Decoded (whole input, label-bearing tokens) of the first ``n`` collated examples."""
    tok = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    whole, trained = [], []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        whole.append(tok.decode(ids))
        trained.append(tok.decode(ids[labels != -100]))
    return whole, trained


def test_prompt_completion_trains_on_the_completion_only(settings: Settings, tmp_path: Path) -> None:
    rec = Recorder()
    trainer, data, _, _ = build_trainer(_payload(PC_ROWS), rec, settings, str(tmp_path / "run"))
    assert data.format == "prompt_completion"
    _, trained = _trained_text(trainer)
    for example, text in zip(data.train, trained, strict=False):
        assert text == example["completion"] + "<eos>", (text, example)
        assert "plus" not in text
    trainer.train()
    assert rec.steps == [1, 2]


def test_messages_train_on_assistant_turns_only(settings: Settings, tmp_path: Path) -> None:
    rec = Recorder()
    trainer, data, _, _ = build_trainer(_payload(CHAT_ROWS), rec, settings, str(tmp_path / "run"))
    assert data.format == "messages"
    whole, trained = _trained_text(trainer)
    for example, full, text in zip(data.train, whole, trained, strict=False):
        replies = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
        users = [m["content"] for m in example["messages"] if m["role"] == "user"]
        assert all(u in full for u in users), "the user turns are in the input"
        assert text == "".join(f"{r}<end_of_turn>\n" for r in replies), text
        assert not any(u in text for u in users)
    trainer.train()
    assert rec.steps == [1, 2]


def test_stats_drops_and_seeded_validation_split(settings: Settings, tmp_path: Path,
                                                 quotes: list[dict[str, Any]]) -> None:
    rows = [*quotes[:60], {"quote": "no author here"}, {"quote": "", "author": ""}]
    rec = Recorder()
    _, data, _, _ = build_trainer(_payload(rows), rec, settings, str(tmp_path / "a"))
    stats = data.stats
    assert stats["format"] == "template" and stats["rows_total"] == 62 and stats["rows_used"] == 60
    assert stats["rows_dropped"] == {"missing field 'author'": 1, "empty": 1}
    assert stats["validation_rows"] == 6 and stats["train_rows"] == 54 == len(data.train)
    assert stats["epochs"] == round(2 * 4 / 54, 3)
    tokens = stats["tokens"]
    assert 0 < tokens["mean"] <= tokens["p95"] <= tokens["max"] and tokens["over_max_length"] == 0
    assert len(data.sample_prompts) == 3 and all(str(p).startswith("Quote: ") for p in data.sample_prompts)
    assert data.validation is not None
    _, again, _, _ = build_trainer(_payload(rows), Recorder(), settings, str(tmp_path / "b"))
    assert again.validation is not None and list(again.validation["text"]) == list(data.validation["text"])

    _, none, _, _ = build_trainer(_payload(rows, validation={"fraction": 0}), Recorder(), settings, str(tmp_path / "c"))
    assert none.validation is None and none.stats["train_rows"] == 60
