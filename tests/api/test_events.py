"""The job event log over HTTP: a JSON page, and a live SSE stream that ends with the job and resumes."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.conftest import assert_error, tiny_job, wait_for


def _sse(client: httpx.Client, job_id: str, last_id: str | None = None) -> list[dict[str, Any]]:
    headers = {"accept": "text/event-stream"} | ({"last-event-id": last_id} if last_id else {})
    events: list[dict[str, Any]] = []
    with client.stream("GET", f"/jobs/{job_id}/events", headers=headers, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        frame: dict[str, str] = {}
        for line in resp.iter_lines():
            if line.startswith(("id: ", "event: ", "data: ")):
                key, _, value = line.partition(": ")
                frame[key] = value
            elif not line and "data" in frame:
                data = json.loads(frame["data"])
                assert data["id"] == frame["id"] and data["type"] == frame["event"]
                events.append(data)
                frame = {}
    return events


def test_live_stream_ends_with_the_job_and_resumes(client: httpx.Client, quotes: list[dict[str, Any]]) -> None:
    job = client.post("/jobs", json=tiny_job(quotes[:8], max_steps=3)).json()
    live = _sse(client, job["id"])  # opened while queued or running; returns once the job has ended
    kinds = [e["type"] for e in live]
    lifecycle = [k for k in kinds if k != "phase"]  # phase events come between (tests/train/test_recipe.py)
    assert lifecycle[:3] == ["queued", "started", "dataset_stats"], kinds
    assert lifecycle.count("step") == 3 and lifecycle[-2:] == ["adapter_saved", "succeeded"], kinds
    assert kinds[2] == "phase" and kinds[-3] == "phase", "preparing data first; saving before the adapter is saved"
    assert [e["data"]["step"] for e in live if e["type"] == "step"] == [1, 2, 3]
    assert wait_for(client, job["id"])["status"] == "succeeded"

    resumed = _sse(client, job["id"], last_id=live[2]["id"])
    assert [e["id"] for e in resumed] == [e["id"] for e in live[3:]]

    page1 = client.get(f"/jobs/{job['id']}/events", params={"limit": 4}).json()
    assert page1["has_more"] and [e["id"] for e in page1["data"]] == [e["id"] for e in live[:4]]
    page2 = client.get(f"/jobs/{job['id']}/events", params={"after": page1["next_after"], "limit": 100}).json()
    assert not page2["has_more"] and [e["id"] for e in page2["data"]] == [e["id"] for e in live[4:]]


def test_failed_and_cancelled_jobs_end_their_streams(client: httpx.Client, quotes: list[dict[str, Any]]) -> None:
    failing = client.post("/jobs", json={"base_model": "tiny-gemma", "dataset": {"hub": {"name": "no/such-set"}},
                                         "hyperparameters": {"max_steps": 1}}).json()
    events = _sse(client, failing["id"])
    assert events[-1]["type"] == "failed" and events[-1]["data"]["error"]["code"] == "dataset_unavailable"

    long = client.post("/jobs", json=tiny_job(quotes[:8], max_steps=5000)).json()
    wait_for(client, long["id"], set(), check=lambda j: j["progress"]["step"] >= 1)
    client.post(f"/jobs/{long['id']}/cancel")
    kinds = [e["type"] for e in _sse(client, long["id"])]
    assert "cancel_requested" in kinds and kinds[-1] == "cancelled"


def test_events_and_metrics_bad_input(client: httpx.Client) -> None:
    assert_error(client.get("/jobs/job_0000000000000000000000/events"), 404, "job_not_found")
    assert_error(client.get("/jobs/job_0000000000000000000000/metrics"), 404, "job_not_found")
    job_id = client.post("/jobs", json=tiny_job([{"quote": "q", "author": "a"}], max_steps=1)).json()["id"]
    assert_error(client.get(f"/jobs/{job_id}/events", params={"after": "x"}), 422, "invalid_request", "after")
    assert_error(client.get(f"/jobs/{job_id}/events", headers={"accept": "text/event-stream", "last-event-id": "nope"}),
                 422, "invalid_request", "Last-Event-ID")
