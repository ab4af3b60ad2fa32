"""Limits, each a clear 4xx, on the keyed service (tests/keyed.py ``MAIN_LIMITS``): body size, sizes in
job and generate bodies, per-tenant queued + running jobs, per-tenant generate rate; and user strings
never becoming paths."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TERMINAL, assert_error
from tests.keyed import MAIN_LIMITS, Keyed

ROWS = [{"quote": f"Quote number {i}.", "author": "A"} for i in range(8)]
UNKNOWN_JOB = "job_" + "f" * 22


def small_job(**hp: Any) -> dict[str, Any]:
    hyper = {"max_steps": 1, "batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 16,
             "gradient_checkpointing": False, "seed": 1} | hp
    return {"base_model": "tiny-gemma", "dataset": {"rows": ROWS[:4]}, "hyperparameters": hyper,
            "sample_prompts": ["Quote:"]}


@pytest.fixture(scope="module")
def beta(keyed: Keyed) -> Iterator[httpx.Client]:
    with keyed.client("beta") as c:
        yield c


def test_body_size_by_length_and_by_counting(keyed: Keyed, beta: httpx.Client) -> None:
    limit = int(MAIN_LIMITS["FTAAS_MAX_BODY_BYTES"])
    big = small_job() | {"name": "x" * 10, "metadata": {"pad": "y" * 500}}
    big["dataset"]["rows"] = [{"quote": "z" * 2000, "author": "a"}] * (limit // 2000 + 5)
    raw = json.dumps(big).encode()
    assert len(raw) > limit
    err = assert_error(beta.post("/jobs", content=raw, headers={"content-type": "application/json"}), 413,
                       "payload_too_large")
    assert f"{limit:,}" in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed body is counted
        for i in range(0, len(raw), 16 * 1024):
            yield raw[i:i + 16 * 1024]

    resp = beta.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in resp.request.headers
    assert_error(resp, 413, "payload_too_large")
    v1 = beta.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert v1.status_code == 413 and v1.json()["error"]["code"] == "payload_too_large"
    assert v1.json()["error"]["type"] == "invalid_request_error"
    # under the limit the same route answers normally
    assert beta.post("/jobs", json={"dataset": {}}).status_code == 422


@pytest.mark.parametrize("body, field, words", [
    ({"dataset": {"rows": ROWS * 26}}, "dataset.rows", "208 inline rows"),
    ({"validation": {"dataset": {"rows": ROWS * 26}}}, "validation.dataset.rows", "at most 200"),
    ({"hyperparameters": {"max_steps": 1000, "batch_size": 2, "gradient_accumulation_steps": 3}},
     "hyperparameters.max_steps", "6,000 examples"),
    ({"hyperparameters": {"max_length": 1024}}, "hyperparameters.max_length", "at most 512"),
])
def test_job_limits(beta: httpx.Client, body: dict[str, Any], field: str, words: str) -> None:
    job, body = small_job(), dict(body)
    job["hyperparameters"] |= body.pop("hyperparameters", {})
    job |= body
    err = assert_error(beta.post("/jobs", json=job), 422, "limit_exceeded", field)
    assert words in err["message"], err


@pytest.mark.parametrize("body, field", [
    ({"prompt": "Q", "max_new_tokens": 33}, "max_new_tokens"),
    ({"prompt": "Q" * 301}, "prompt"),
    ({"prompts": ["a", "b", "c", "d", "e"]}, "prompts"),
    ({"prompts": ["a", "b" * 301]}, "prompts"),
])
def test_generate_limits(keyed: Keyed, body: dict[str, Any], field: str) -> None:
    with keyed.client("root") as c:  # an admin: not rate limited, still size limited
        assert_error(c.post("/generate", json={"base_model": "tiny-gemma"} | body), 422, "limit_exceeded", field)
        if "prompt" in body:
            v1 = c.post("/v1/completions", json={"model": "tiny-gemma", "prompt": body["prompt"],
                                                 "max_tokens": body.get("max_new_tokens", 4)})
            assert v1.status_code == 400 and v1.json()["error"]["code"] == "limit_exceeded", v1.text


def _wait_terminal(c: httpx.Client, job_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while (status := c.get(f"/jobs/{job_id}").json()["status"]) not in TERMINAL:
        assert time.monotonic() < deadline, job_id
        time.sleep(0.3)
    return str(status)


def test_queued_and_running_jobs_per_tenant(keyed: Keyed, beta: httpx.Client) -> None:
    cap = int(MAIN_LIMITS["FTAAS_MAX_ACTIVE_JOBS"])
    made = []
    for _ in range(cap):
        r = beta.post("/jobs", json=small_job())
        assert r.status_code == 202, r.text
        made.append(r.json()["id"])
    over = beta.post("/jobs", json=small_job())
    err = assert_error(over, 429, "too_many_jobs")
    assert "beta" in err["message"] and over.headers["retry-after"].isdigit()
    with keyed.client("gamma") as other, keyed.client("root") as admin:
        r = other.post("/jobs", json=small_job())  # another tenant is not held back by beta's cap
        assert r.status_code == 202, r.text
        other.post(f"/jobs/{r.json()['id']}/cancel")
        extra = [admin.post("/jobs", json=small_job()) for _ in range(cap + 1)]  # admins are not capped
        assert [x.status_code for x in extra] == [202] * (cap + 1)
        for x in extra:
            admin.post(f"/jobs/{x.json()['id']}/cancel")
    for job_id in made:
        assert beta.post(f"/jobs/{job_id}/cancel").status_code == 202
    # a cancelled queued job frees its slot at once; a running one when it stops at its next step
    deadline = time.monotonic() + 600
    while (r := beta.post("/jobs", json=small_job())).status_code == 429:
        assert time.monotonic() < deadline
        time.sleep(1)
    assert r.status_code == 202, r.text
    beta.post(f"/jobs/{r.json()['id']}/cancel")
    assert {_wait_terminal(beta, j) for j in made} <= {"cancelled", "succeeded"}


def test_generate_rate_per_tenant(keyed: Keyed) -> None:
    rate, window = int(MAIN_LIMITS["FTAAS_GENERATE_RATE"]), int(MAIN_LIMITS["FTAAS_GENERATE_RATE_WINDOW_S"])
    body = {"adapter": UNKNOWN_JOB, "prompt": "Q", "max_new_tokens": 1}  # counted, then 404: no generation
    with keyed.client("gamma") as c, keyed.client("root") as admin:
        statuses = []
        for _ in range(3 * rate):  # a window may roll over once on the way
            r = c.post("/generate", json=body)
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {404} and rate <= len(statuses) - 1 <= 2 * rate
        err = assert_error(r, 429, "rate_limited")
        retry = int(r.headers["retry-after"])
        assert 1 <= retry <= window and f"{rate} generate requests per {window} s" in err["message"]
        v1 = c.post("/v1/completions", json={"model": UNKNOWN_JOB, "prompt": "Q"})
        assert v1.status_code in (404, 429)  # the model is resolved first: an unknown one is 404
        assert [admin.post("/generate", json=body).status_code for _ in range(rate + 2)] == [404] * (rate + 2)
        time.sleep(retry + 0.2)
        assert c.post("/generate", json=body).status_code == 404  # a new window


def test_rate_limit_in_openai_shape(keyed: Keyed) -> None:
    with keyed.client("gamma") as c:
        for _ in range(3 * int(MAIN_LIMITS["FTAAS_GENERATE_RATE"])):
            r = c.post("/v1/chat/completions", json={"model": "tiny-gemma", "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": "x" * 400}]})
            if r.status_code == 429:
                break
            assert r.status_code == 400 and r.json()["error"]["code"] == "limit_exceeded", r.text
        assert r.status_code == 429, r.text
        assert r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1


def test_user_strings_never_become_paths(keyed: Keyed, beta: httpx.Client, data_dir: Path) -> None:
    up = beta.post("/datasets", files={"file": ("../../../escape.jsonl", b'{"quote": "q", "author": "a"}\n')})
    assert up.status_code == 201, up.text
    meta = up.json()
    assert meta["filename"] == "../../../escape.jsonl" and meta["id"].startswith("ds_")
    assert not list(data_dir.parent.rglob("escape.jsonl"))
    assert (data_dir / "datasets" / f"{meta['id']}.jsonl").is_file()
    for path in ("/jobs/..%2F..%2Fetc%2Fpasswd", "/datasets/..%2Fdatasets", "/jobs/job_x%00", "/v1/files/%2E%2E"):
        assert beta.get(path).status_code == 404, path
    assert_error(beta.post("/jobs", json=small_job() | {"name": "bad\nname"}), 422, "invalid_request", "name")
    assert_error(beta.post("/jobs", json=small_job() | {"base_model": "../../etc"}), 422, "invalid_request",
                 "base_model")
