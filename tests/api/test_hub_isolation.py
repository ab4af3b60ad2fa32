"""Issue 13: a hub dataset name is a hub id and nothing else, so no tenant reaches another's uploads through it.

The exploit: with a relative ``FTAAS_DATA_DIR`` (``make run``'s default ``data``), a job naming the hub dataset
``data`` (or ``data/datasets``) made ``datasets.load_dataset`` read the store's folder relative to the worker's
working directory: every tenant's uploads. Here a keyed service runs in a scratch working directory with
``FTAAS_DATA_DIR=data`` and a checkout-like ``examples`` folder beside it, and an offline hub cache holding one
real dataset repo (``fixture/quotes``), so the real hub path is exercised and shown to still work. Tenant beta
uploads rows carrying a canary; tenant alpha tries every variant; the canary must appear nowhere alpha reads.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, TERMINAL, assert_error
from tests.keyed import Keyed, keyed_service

HP = {"max_steps": 1, "batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 32,
      "gradient_checkpointing": False, "seed": 3}
CACHED_REPO, CACHED_COMMIT = "fixture/quotes", "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_dataset(hub_cache: Path, repo: str, rows: list[dict[str, Any]], commit: str = CACHED_COMMIT) -> None:
    """A dataset repo as huggingface_hub's cache holds a downloaded one: ``refs/main`` -> ``snapshots/<commit>``."""
    folder = hub_cache / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "quotes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def isolated(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    workdir = tmp_path_factory.mktemp("workdir")
    shutil.copytree(ROOT / "examples", workdir / "examples")  # a folder of the checkout, as under `make run`
    hf_home = tmp_path_factory.mktemp("hf_home")
    lay_out_hub_dataset(hf_home / "hub", CACHED_REPO,
                        [{"quote": f"Hub words number {i}.", "author": "Hub"} for i in range(8)])
    extra = {"FTAAS_DATA_DIR": "data", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
             "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FTAAS_MAX_ACTIVE_JOBS": "20"}
    with keyed_service(service_env, tmp_path_factory.mktemp("isolation-logs"), "isolation", train=True,
                       generate=True, extra_env=extra, cwd=workdir) as svc:
        svc.env["WORKDIR"] = str(workdir)
        yield svc


def _finish(c: httpx.Client, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.5)


#: Names the schema refuses outright (field, value): paths, builders, URLs, globs, bare words, bad revisions.
REFUSED = [
    ("dataset.hub.name", {"dataset": {"hub": {"name": "data"}}}),
    ("dataset.hub.name", {"dataset": {"hub": {"name": "./data"}}}),
    ("dataset.hub.name", {"dataset": {"hub": {"name": "examples"}}}),
    ("dataset.hub.name", {"dataset": {"hub": {"name": "json"}}}),
    ("dataset.hub.name", {"dataset": {"hub": {"name": "data/../data"}}}),
    ("dataset.hub.name", {"dataset": {"hub": {"name": "/etc/passwd"}}}),
    ("dataset.hub.name", {"dataset": {"hub": {"name": "https://example.org/x.jsonl"}}}),
    ("dataset.hub.name", {"dataset": {"hub": {"name": "data/datasets/*.jsonl"}}}),
    ("dataset.hub.name", {"dataset": {"hub": {"name": "data/datasets/ds_x.jsonl/x"}}}),
    ("dataset.hub.revision", {"dataset": {"hub": {"name": CACHED_REPO, "revision": "../../../../etc"}}}),
    ("dataset.hub.split", {"dataset": {"hub": {"name": CACHED_REPO, "split": "train/../x y"}}}),
    ("validation.dataset.hub.name", {"dataset": {"rows": [{"quote": "a b", "author": "c"}]},
                                     "validation": {"dataset": {"hub": {"name": "data"}}}}),
]


def test_hub_names_that_are_paths_never_read_another_tenants_uploads(isolated: Keyed) -> None:
    canary = f"canary{secrets.token_hex(8)}"
    beta_rows = [{"quote": f"{canary} secret line {i}.", "author": "Beta"} for i in range(6)]
    with isolated.client("beta") as beta:
        up = beta.post("/datasets", files={"file": ("b.jsonl", "".join(json.dumps(r) + "\n" for r in beta_rows))})
        assert up.status_code == 201, up.text
    store = Path(isolated.env["WORKDIR"]) / "data" / "datasets"
    assert any(canary in p.read_text() for p in store.glob("*.jsonl"))  # the store really is at ./data

    with isolated.client("alpha") as alpha:
        for field, body in REFUSED:
            resp = alpha.post("/jobs", json={"base_model": "tiny-gemma", "hyperparameters": HP} | body)
            assert_error(resp, 422, "invalid_request", field)
            assert canary not in resp.text
        # names that pass the pattern (they are well-formed hub ids) but are local folders of the worker: the
        # worker resolves them on the hub only, so they fail as unavailable instead of loading the folder
        bodies = [{"dataset": {"hub": {"name": "data/datasets"}}},
                  {"dataset": {"hub": {"name": "examples/quotes.jsonl"}}},
                  {"dataset": {"rows": [{"quote": "Alpha words here.", "author": "A"}] * 4},
                   "validation": {"dataset": {"hub": {"name": "data/datasets"}}}}]
        refused_jobs = []
        for body in bodies:
            resp = alpha.post("/jobs", json={"base_model": "tiny-gemma", "hyperparameters": HP,
                                             "sample_prompts": ["Hub words"]} | body)
            assert resp.status_code == 202, resp.text
            refused_jobs.append(resp.json()["id"])
        # the real hub path still works: a dataset repo in the (offline) hub cache trains
        ok = alpha.post("/jobs", json={"base_model": "tiny-gemma", "hyperparameters": HP,
                                       "dataset": {"hub": {"name": CACHED_REPO}}, "validation": {"fraction": 0.25}})
        assert ok.status_code == 202, ok.text
        for job_id in refused_jobs:
            job = _finish(alpha, job_id)
            assert job["status"] == "failed" and job["error"]["code"] == "dataset_unavailable", job
        good = _finish(alpha, ok.json()["id"])
        assert good["status"] == "succeeded", good
        assert good["dataset_stats"]["rows_total"] == 8
        assert good["evaluation"]["samples"], good
        assert all("Hub words" in s["prompt"] for s in good["evaluation"]["samples"]), good["evaluation"]
        gen = alpha.post("/generate", json={"adapter": good["id"], "prompt": "Hub words", "max_new_tokens": 4})
        assert gen.status_code == 200, gen.text

        # everything alpha can list or read, after the attempts
        seen = [gen]
        for path in ("/jobs?limit=100", "/datasets", "/v1/files", "/v1/fine_tuning/jobs", "/v1/models", "/adapters"):
            seen.append(alpha.get(path))
        for job_id in [*refused_jobs, good["id"]]:
            for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/events", f"/jobs/{job_id}/metrics",
                         f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events"):
                seen.append(alpha.get(path))
            seen.append(alpha.get(f"/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}))
        model = alpha.get(f"/v1/fine_tuning/jobs/{good['id']}").json()["fine_tuned_model"]
        seen.append(alpha.post("/v1/completions", json={"model": model, "prompt": "Hub words", "max_tokens": 4}))
    assert all(r.status_code == 200 for r in seen), [(r.request.url, r.status_code) for r in seen
                                                     if r.status_code != 200]
    for resp in seen:
        assert canary not in resp.text, resp.request.url
    with isolated.client("beta") as beta:  # the upload is still there, and still beta's alone
        assert [d["id"] for d in beta.get("/datasets").json()["data"]] == [up.json()["id"]]
