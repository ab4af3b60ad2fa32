"""``GET /metrics`` against the running service: the Prometheus text parsed and checked against the API."""

from __future__ import annotations

import threading
import time
from itertools import pairwise
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.api.routes.ops import tokens_per_second
from tests.conftest import tiny_job, wait_for

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HP = {"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 64,
      "gradient_checkpointing": False}


def scrape(client: httpx.Client) -> Samples:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain"), resp.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported; have {sorted({n for n, _ in samples})}"
    return samples[key]


def listed(client: httpx.Client, status: str) -> int:
    """How many jobs ``GET /jobs?status=`` lists, every page."""
    n, after = 0, None
    while True:
        page = client.get("/jobs", params={"status": status, "limit": 100} | ({"after": after} if after else {}))
        body = page.json()
        n += len(body["data"])
        if not body["has_more"]:
            return n
        after = body["next_after"]


@pytest.fixture(scope="module")
def trained(service: str, client: httpx.Client, quotes: list[dict[str, Any]]) -> dict[str, Any]:
    """One tiny job, then two more cancelled at once. The train worker runs the first and holds the
    second, so the third's message waits in the queue's Redis list until the first ends (the worker
    then skips both). Meanwhile a base-model generate warms the generate worker.
    Returns the job ids and the deepest train queue seen."""
    warm = threading.Thread(target=lambda: httpx.post(f"{service}/generate", timeout=120,
                                                      json={"prompt": "Quote: A", "max_new_tokens": 2}))
    warm.start()
    ids = []
    for seed in range(3):
        resp = client.post("/jobs", json=tiny_job(quotes[seed * 8:(seed + 1) * 8], **HP, seed=seed))
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    for job_id in ids[1:]:
        assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    deepest, deadline = 0.0, time.monotonic() + 10
    while deepest < 1 and time.monotonic() < deadline:
        deepest = max(deepest, value(scrape(client), "ftaas_queue_depth", queue="train"))
        time.sleep(0.1)
    assert wait_for(client, ids[0], timeout=120)["status"] == "succeeded"
    warm.join(120)
    return {"ids": ids, "deepest_train_queue": deepest}


def test_queue_depth_is_the_celery_list(client: httpx.Client, trained: dict[str, Any]) -> None:
    samples = scrape(client)
    for queue in ("train", "generate"):
        assert value(samples, "ftaas_queue_depth", queue=queue) >= 0
    assert trained["deepest_train_queue"] >= 1, "a job waiting for the train worker was never counted"
    deadline = time.monotonic() + 10  # the last job's message has left the list once it succeeded
    while value(scrape(client), "ftaas_queue_depth", queue="train") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert value(scrape(client), "ftaas_queue_depth", queue="train") == 0
    assert value(samples, "ftaas_store_up") == 1
    assert value(samples, "ftaas_training_tokens_per_second") >= 0


def test_jobs_by_status_match_the_listing(client: httpx.Client, trained: dict[str, Any]) -> None:
    # Other tests' jobs may be moving: take a reading that did not change while the listing was read.
    for _ in range(20):
        before = scrape(client)
        counts = {s: listed(client, s) for s in STATUSES}
        after = scrape(client)
        exported = {s: value(after, "ftaas_jobs", status=s) for s in STATUSES}
        if exported == {s: value(before, "ftaas_jobs", status=s) for s in STATUSES} and exported == counts:
            break
        time.sleep(0.5)
    assert exported == counts
    assert counts["succeeded"] >= 1 and counts["cancelled"] >= 2


def test_generate_latency_tokens_and_adapter_cache(client: httpx.Client, trained: dict[str, Any]) -> None:
    adapter = trained["ids"][0]
    seen = [scrape(client)]
    bodies = []
    for _ in range(2):
        resp = client.post("/generate", json={"adapter": adapter, "prompt": "Quote: Be", "max_new_tokens": 6})
        assert resp.status_code == 200, resp.text
        bodies.append(resp.json())
        seen.append(scrape(client))
    def deltas(name: str) -> list[float]:
        return [value(new, name) - value(old, name) for old, new in pairwise(seen)]

    assert deltas("ftaas_generate_latency_seconds_count") == [1, 1]
    assert deltas("ftaas_generate_latency_seconds_sum") == pytest.approx(
        [b["timing"]["total_ms"] / 1000 for b in bodies], abs=1e-3)
    assert deltas("ftaas_generated_tokens_total") == [sum(o["tokens"] for o in b["outputs"]) for b in bodies]
    assert all(o["tokens"] > 0 for b in bodies for o in b["outputs"])
    assert deltas("ftaas_adapter_loads_total") == [1, 0], "first use loads the adapter"
    assert deltas("ftaas_adapter_cache_hits_total") == [0, 1], "second use finds it cached"
    last = seen[-1]
    assert value(last, "ftaas_generate_latency_seconds_bucket", le="+Inf") == value(
        last, "ftaas_generate_latency_seconds_count")
    assert "adapter_cache" not in bodies[0], "the worker's cache report is not part of the response"


def test_tokens_per_second_uses_the_two_latest_steps() -> None:
    points = [{"step": 1, "time": 1.0, "tokens_seen": 100, "loss": 2.0},
              {"step": 2, "time": 3.0, "tokens_seen": 500, "loss": 1.9},
              {"step": 2, "time": 3.5, "eval_loss": 1.8}]  # an eval point carries no tokens
    assert tokens_per_second(points) == pytest.approx(200.0)
    assert tokens_per_second(points[:1]) == pytest.approx(100.0)  # one step: since the job started
    assert tokens_per_second(points[2:]) == 0.0
    assert tokens_per_second([]) == 0.0
