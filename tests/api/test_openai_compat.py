"""The OpenAI-compatible routes, driven by the official ``openai`` client against the running service."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob

from tests.conftest import assert_error

CHAT_ROWS = [{"messages": [{"role": "system", "content": "You answer with a quote."},
                           {"role": "user", "content": f"Give me quote number {i}."},
                           {"role": "assistant", "content": f"Quote {i}: be yourself; everyone else is taken."}]}
             for i in range(6)]


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def strict_client(service: str) -> OpenAI:
    """The official client as user code makes it, also checking every answer against its types."""
    return OpenAI(base_url=f"{service}/v1", api_key="x", max_retries=0, timeout=120, _strict_response_validation=True)


@pytest.fixture(scope="module")
def oai(service: str) -> Iterator[OpenAI]:
    with strict_client(service) as c:
        yield c


def _wait(oai: OpenAI, job_id: str, status: str, timeout: float = 60) -> FineTuningJob:
    deadline = time.monotonic() + timeout
    while True:
        job = oai.fine_tuning.jobs.retrieve(job_id)
        if job.status == status:
            return job
        assert job.status not in {"succeeded", "failed", "cancelled"}, job
        assert time.monotonic() < deadline, f"{job_id} still {job.status}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def trained(oai: OpenAI, client: httpx.Client) -> FineTuningJob:
    """A chat file uploaded and a job on it trained to success; a long job is cancelled meanwhile."""
    f = oai.files.create(file=("chat.jsonl", _jsonl(CHAT_ROWS)), purpose="fine-tune")
    assert f.id.startswith("ds_") and f.object == "file" and f.status == "processed" and f.purpose == "fine-tune"
    assert f.bytes == len(_jsonl(CHAT_ROWS)) and f.filename == "chat.jsonl"
    assert oai.files.retrieve(f.id).id == f.id
    job = oai.fine_tuning.jobs.create(model="tiny-gemma", training_file=f.id, suffix="quotes", seed=3,
                                      hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 2},
                                      metadata={"team": "qa"})
    assert job.object == "fine_tuning.job" and job.status in {"queued", "running"} and job.fine_tuned_model is None
    hp = client.get(f"/jobs/{job.id}").json()["request"]["hyperparameters"]
    assert (hp["max_steps"], hp["batch_size"], hp["gradient_accumulation_steps"]) == (3, 2, 1)
    assert hp["learning_rate"] == pytest.approx(4e-4) and hp["seed"] == 3

    # a long job, queued behind the first: cancelled at once; cancelling it again is a conflict
    long = oai.fine_tuning.jobs.create(model="tiny-gemma", training_file=f.id,
                                       hyperparameters={"n_epochs": 50, "batch_size": 1})
    assert client.get(f"/jobs/{long.id}").json()["request"]["hyperparameters"]["max_steps"] == 300
    cancelled = oai.fine_tuning.jobs.cancel(long.id)
    assert cancelled.status in {"cancelled", "running"}
    assert _wait(oai, long.id, "cancelled").finished_at is not None
    with pytest.raises(openai.ConflictError):
        oai.fine_tuning.jobs.cancel(long.id)
    return _wait(oai, job.id, "succeeded")


def test_fine_tuning_job_fields(trained: FineTuningJob) -> None:
    job = trained
    assert job.fine_tuned_model == f"ft:tiny-gemma:quotes:{job.id}"
    assert job.model == "tiny-gemma" and job.error is None and job.result_files == []
    assert job.organization_id and job.finished_at and job.finished_at >= job.created_at
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 2
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(2)
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.seed == 3 and job.metadata == {"team": "qa"} and job.validation_file is None
    assert job.training_file and job.training_file.startswith("ds_")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a value of another type than the client's warns when dumped
        assert job.model_dump()["hyperparameters"] == {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 2}


def test_list_jobs_and_events(oai: OpenAI, trained: FineTuningJob) -> None:
    page = oai.fine_tuning.jobs.list(limit=1)
    assert len(page.data) == 1 and page.has_more
    second = page.get_next_page()
    assert second.data and second.data[0].id < page.data[0].id  # newest first, cursor is the last id
    assert trained.id in {j.id for j in oai.fine_tuning.jobs.list(limit=100).data}

    events = oai.fine_tuning.jobs.list_events(trained.id, limit=100).data
    assert all(e.object == "fine_tuning.job.event" and e.level in {"info", "warn", "error"} for e in events)
    assert events[0].message == "The job has successfully completed" and events[-1].message == "Fine-tuning job queued"
    steps = [e.data for e in events if e.type == "metrics" and isinstance(e.data, dict) and "train_loss" in e.data]
    assert [d["step"] for d in steps] == [3, 2, 1]
    first = oai.fine_tuning.jobs.list_events(trained.id, limit=2)
    assert first.has_more and [e.id for e in first.get_next_page().data] == [e.id for e in events[2:4]]


def test_models(oai: OpenAI, trained: FineTuningJob) -> None:
    ids = [m.id for m in oai.models.list().data]
    assert "tiny-gemma" in ids and "gemma-3-270m" in ids and trained.fine_tuned_model in ids
    assert oai.models.retrieve(str(trained.fine_tuned_model)).id == trained.fine_tuned_model
    assert oai.models.retrieve("tiny-gemma").owned_by == "ftaas"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("ft:tiny-gemma:job_0000000000000000000000")


def test_completions_with_the_fine_tuned_model(oai: OpenAI, trained: FineTuningJob) -> None:
    model = str(trained.fine_tuned_model)
    done = oai.completions.create(model=model, prompt="Quote", max_tokens=6, temperature=0)
    assert done.object == "text_completion" and done.model == model and len(done.choices) == 1
    assert isinstance(done.choices[0].text, str) and done.choices[0].finish_reason in {"stop", "length"}
    assert done.usage and 0 < done.usage.completion_tokens <= 6
    by_job_id = oai.completions.create(model=trained.id, prompt="Quote", max_tokens=6, temperature=0)
    assert by_job_id.choices[0].text == done.choices[0].text  # the bare job id names the same model

    messages: list[Any] = [{"role": "system", "content": "Answer with a quote."},
                           {"role": "user", "content": "Give me quote number 2."}]
    whole = oai.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    chunks = list(oai.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in {"stop", "length"}
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]

    assert chunks[0].choices[0].delta.role == "assistant"
    assert whole.usage and whole.usage.prompt_tokens > 0

    # log probabilities come from the adapter's rows too: greedy picks the likeliest token
    scored = oai.completions.create(model=model, prompt="Quote", max_tokens=4, temperature=0, logprobs=2)
    lp = scored.choices[0].logprobs
    assert lp and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert done.choices[0].text.startswith(scored.choices[0].text)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == scored.usage.completion_tokens  # type: ignore[union-attr]
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob, abs=1e-3) and logprob <= 0


def test_errors_in_openai_shape(oai: OpenAI, service: str, client: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert nf.value.code == "model_not_found" and nf.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="ft:tiny-gemma:job_0000000000000000000000",
                                    messages=[{"role": "user", "content": "x"}])
    f = oai.files.create(file=("chat.jsonl", _jsonl(CHAT_ROWS[:1])), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as bad:
        oai.fine_tuning.jobs.create(model="no-such-model", training_file=f.id)
    assert bad.value.param == "model" and bad.value.code == "unknown_base_model"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.fine_tuning.jobs.create(model="tiny-gemma", training_file=f.id, hyperparameters={"n_epochs": 0})
    with pytest.raises(openai.NotFoundError) as nf:
        oai.fine_tuning.jobs.create(model="tiny-gemma", training_file="ds_" + "0" * 22)
    assert nf.value.param == "training_file"
    with pytest.raises(openai.NotFoundError):
        oai.fine_tuning.jobs.retrieve("job_0000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve("ds_" + "0" * 22)
    with pytest.raises(openai.BadRequestError) as bad:
        oai.files.create(file=("plain.jsonl", _jsonl([{"text": "no chat here"}])), purpose="fine-tune")
    assert bad.value.code == "invalid_file_format"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.files.create(file=("chat.jsonl", _jsonl(CHAT_ROWS)), purpose="assistants")
    assert bad.value.param == "purpose"

    resp = httpx.post(f"{service}/v1/chat/completions", json={"model": "tiny-gemma", "messages": []})
    assert resp.status_code == 400 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert_error(client.get("/jobs/job_0000000000000000000000"), 404, "job_not_found")  # ftaas keeps its envelope
