"""Hub ids (app/core/ids.py) and their siblings: what the API admits as a hub dataset, a revision or a hub model,
and what the worker refuses even when a payload in Redis holds it (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.errors import UserFacingError
from app.core.ids import hub_repo_id_problem, revision_problem
from app.core.jobs import HubDataset
from app.core.settings import Settings
from worker.models import _source
from worker.train.data import check_links, hub_rows


@pytest.mark.parametrize("name", ["Abirate/english_quotes", "google/gemma-2b", "a/b", "org-1/set_2.v3"])
def test_hub_ids_admitted(name: str) -> None:
    assert hub_repo_id_problem(name) is None
    assert HubDataset(name=name).name == name


@pytest.mark.parametrize("name", ["data", "json", "csv", "examples", "./data", "../x", "data/../x", "/etc/passwd",
                                  "a//b", "a/b/c", "https://host/x.jsonl", "hf://datasets/a/b", "a/*.jsonl",
                                  "a/b.git", "a--b/c", "a/.hidden", "a\\b", "a/b\n", "", "-a/b"])
def test_hub_ids_refused(name: str) -> None:
    assert hub_repo_id_problem(name) is not None
    with pytest.raises(ValidationError):
        HubDataset(name=name)


@pytest.mark.parametrize("rev", ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567"])
def test_revisions_admitted(rev: str) -> None:
    assert revision_problem(rev) is None


@pytest.mark.parametrize("rev", ["../../etc", "a/../b", "/abs", "a b", "x:y", "main/", "a.lock", ""])
def test_revisions_refused(rev: str) -> None:
    assert revision_problem(rev) is not None
    with pytest.raises(ValidationError):
        HubDataset(name="a/b", revision=rev)


def test_worker_refuses_a_stored_payload_with_a_path_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload in Redis is not trusted to have passed the schema: the worker checks the name again and never
    hands it to load_dataset, so a folder of that name in its working directory is not read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "datasets").mkdir(parents=True)
    (tmp_path / "data" / "datasets" / "ds_x.jsonl").write_text('{"quote": "secret", "author": "b"}\n')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in ("data", "./data"):
        with pytest.raises(UserFacingError, match="refused"):
            hub_rows({"name": name, "split": "train"}, Settings())
    with pytest.raises(UserFacingError) as err:  # a well-formed id: looked up on the hub (its cache) only
        hub_rows({"name": "data/datasets", "split": "train"}, Settings())
    assert err.value.code == "dataset_unavailable" and "secret" not in err.value.message


def test_hub_model_ids_are_namespaced_and_never_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="FTAAS_HUB_MODELS"):
        Settings(hub_models=["data"])
    settings = Settings(hub_models=["google/gemma-2b"])
    monkeypatch.chdir(tmp_path)
    assert _source("google/gemma-2b", settings)[0] == "google/gemma-2b"  # a hub id, loaded from the hub
    (tmp_path / "google" / "gemma-2b").mkdir(parents=True)  # now a local folder shadows it
    with pytest.raises(UserFacingError) as err:
        _source("google/gemma-2b", settings)
    assert err.value.code == "model_unavailable"


def test_worker_reads_only_datasets_linked_to_the_job() -> None:
    linked = {("ds_a", "job_1")}
    payload = {"dataset": {"id": "ds_a"}, "validation": {"dataset": {"id": "ds_b"}}}
    with pytest.raises(UserFacingError, match="ds_b is not available to job job_1"):
        check_links(payload, "job_1", lambda d, j: (d, j) in linked)
    check_links({"dataset": {"id": "ds_a"}, "validation": None}, "job_1", lambda d, j: (d, j) in linked)
    with pytest.raises(UserFacingError):
        check_links({"dataset": {"id": "ds_a"}}, "job_2", lambda d, j: (d, j) in linked)
