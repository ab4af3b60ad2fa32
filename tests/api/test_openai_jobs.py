"""``/v1/fine_tuning/jobs`` beyond the basics, with the official client (strict types): hyperparameters as the
client's integers, ``metadata`` and its list filter, ``integrations`` accepted and ignored, ``estimated_finish``
from the ETA, and the (empty for now) checkpoint list."""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob

from tests.api.test_openai_compat import CHAT_ROWS, _jsonl, strict_client


@pytest.fixture(scope="module")
def oai(service: str) -> Iterator[OpenAI]:
    with strict_client(service) as c:
        yield c


@pytest.fixture(scope="module")
def file_id(oai: OpenAI) -> str:
    return oai.files.create(file=("chat.jsonl", _jsonl(CHAT_ROWS)), purpose="fine-tune").id  # 6 rows


def _dumps_cleanly(job: FineTuningJob) -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return job.model_dump()


@pytest.mark.parametrize(("n_epochs", "batch_size", "steps", "passes"), [
    (1, 4, 2, 1.333), (3, 5, 4, 3.333), (2, 4, 3, 2.0), ("auto", "auto", 5, 3.333)])
def test_hyperparameters_are_the_clients_integers(oai: OpenAI, client: httpx.Client, file_id: str,
                                                  n_epochs: int | str, batch_size: int | str, steps: int,
                                                  passes: float) -> None:
    job = oai.fine_tuning.jobs.create(model="tiny-gemma", training_file=file_id,
                                      hyperparameters={"n_epochs": n_epochs, "batch_size": batch_size})  # type: ignore[arg-type]
    oai.fine_tuning.jobs.cancel(job.id)
    native = client.get(f"/jobs/{job.id}").json()
    assert native["request"]["hyperparameters"]["max_steps"] == steps
    assert native["dataset_stats"]["epochs"] == pytest.approx(passes, abs=1e-3)  # the exact figure stays native
    for seen in (job, oai.fine_tuning.jobs.retrieve(job.id)):
        hp = _dumps_cleanly(seen)["hyperparameters"]
        assert hp == {"n_epochs": 3 if n_epochs == "auto" else n_epochs, "batch_size": 4 if batch_size == "auto"
                      else batch_size, "learning_rate_multiplier": 1.0}


def test_metadata_filter_and_integrations(oai: OpenAI, file_id: str) -> None:
    tag = secrets.token_hex(4)
    made = [oai.fine_tuning.jobs.create(model="tiny-gemma", training_file=file_id, suffix=f"s{i}",
                                        metadata={"run": tag, "arm": arm},
                                        integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
            for i, arm in enumerate(["a", "b", "a"])]
    for job in made:
        oai.fine_tuning.jobs.cancel(job.id)
        assert job.integrations is None  # accepted, ignored: ftaas reports to no tracker
    assert made[0].metadata == {"run": tag, "arm": "a"}
    page = oai.fine_tuning.jobs.list(metadata={"run": tag, "arm": "a"}, limit=10)
    assert [j.id for j in page.data] == [made[2].id, made[0].id] and not page.has_more
    first = oai.fine_tuning.jobs.list(metadata={"run": tag}, limit=2)
    assert [j.id for j in first.data] == [made[2].id, made[1].id] and first.has_more
    assert [j.id for j in first.get_next_page().data] == [made[0].id]
    assert oai.fine_tuning.jobs.list(metadata={"run": "nothing-" + tag}).data == []
    for job in oai.fine_tuning.jobs.list(limit=100).data:  # jobs made by POST /jobs are the client's type too
        _dumps_cleanly(job)


def test_estimated_finish_and_checkpoints(oai: OpenAI, client: httpx.Client, file_id: str) -> None:
    job = oai.fine_tuning.jobs.create(model="tiny-gemma", training_file=file_id, suffix="eta",
                                      hyperparameters={"n_epochs": 50, "batch_size": 1})
    assert job.estimated_finish is None and job.fine_tuned_model is None
    try:
        deadline = time.monotonic() + 300
        while True:
            seen = oai.fine_tuning.jobs.retrieve(job.id)
            progress = client.get(f"/jobs/{job.id}").json()["progress"]
            if seen.status == "running" and progress["eta_seconds"] is not None:
                break
            assert seen.status in {"queued", "running"} and time.monotonic() < deadline, seen
            time.sleep(0.3)
        assert seen.estimated_finish is not None
        assert abs(seen.estimated_finish - (time.time() + progress["eta_seconds"])) < 30
        page = oai.fine_tuning.jobs.checkpoints.list(job.id)
        assert page.data == [] and page.has_more is False
    finally:
        oai.fine_tuning.jobs.cancel(job.id)
