"""The service end to end on tiny-gemma: real API, real Celery workers, real Redis, real training."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from app.serve import api_argv, local
from tests.conftest import assert_error, free_port, tiny_job, wait_for


def test_job_trains_to_succeeded_with_adapter_files(client: httpx.Client, quotes: list[dict[str, Any]],
                                                    data_dir: Path) -> None:
    resp = client.post("/jobs", json=tiny_job(quotes[:16], max_steps=4) | {"name": "tiny", "metadata": {"a": "b"}})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"]["total_steps"] == 4
    assert job["request"]["dataset"] == {"rows": {"count": 16}}
    assert job["request"]["hyperparameters"]["seed"] == 7 and job["request"]["metadata"] == {"a": "b"}

    done = wait_for(client, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["adapter"] == job["id"]
    assert done["progress"]["step"] == 4 and done["progress"]["fraction"] == 1.0
    assert done["metrics"]["loss"] > 0 and "learning_rate" in done["metrics"]
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    adapter = data_dir / "adapters" / job["id"]
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    listed = client.get("/jobs", params={"status": "succeeded", "limit": 100}).json()["data"]
    assert job["id"] in [j["id"] for j in listed]

    # generate with the adapter and with the base model, batched prompts, through HTTP
    gen = client.post("/generate", json={"adapter": job["id"], "prompts": ["Quote: Be", "Quote: Life is"],
                                         "max_new_tokens": 5})
    assert gen.status_code == 200, gen.text
    body = gen.json()
    assert body["adapter"] == job["id"] and body["base_model"] == "tiny-gemma"
    assert len(body["outputs"]) == 2 and all(0 < o["tokens"] <= 5 for o in body["outputs"])
    assert {"queue_ms", "load_ms", "generate_ms", "total_ms"} <= set(body["timing"])
    base = client.post("/generate", json={"prompt": "Quote: Be", "max_new_tokens": 5})
    assert base.status_code == 200 and base.json()["adapter"] is None
    assert_error(client.post(f"/jobs/{job['id']}/cancel"), 409, "job_finished")


def test_seed_is_chosen_and_recorded(client: httpx.Client, quotes: list[dict[str, Any]]) -> None:
    body = tiny_job(quotes[:4], max_steps=1)
    del body["hyperparameters"]["seed"]
    job = client.post("/jobs", json=body).json()
    assert isinstance(job["request"]["hyperparameters"]["seed"], int)
    assert wait_for(client, job["id"])["status"] == "succeeded"


def test_cancel_running_then_queued_job(client: httpx.Client, quotes: list[dict[str, Any]]) -> None:
    long = client.post("/jobs", json=tiny_job(quotes[:16], max_steps=5000)).json()
    queued = client.post("/jobs", json=tiny_job(quotes[:16], max_steps=2)).json()
    wait_for(client, long["id"], set(), check=lambda j: j["progress"]["step"] >= 2)

    # the second job waits behind the first on the single train worker: cancelling ends it at once
    resp = client.post(f"/jobs/{queued['id']}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"

    resp = client.post(f"/jobs/{long['id']}/cancel")
    assert resp.status_code == 202 and resp.json()["cancel_requested"] is True
    done = wait_for(client, long["id"], timeout=60)
    assert done["status"] == "cancelled" and done["adapter"] is None
    assert 2 <= done["progress"]["step"] < 5000

    time.sleep(2)  # the worker has taken the cancelled job's message by now: it must not run it
    never = client.get(f"/jobs/{queued['id']}").json()
    assert never["status"] == "cancelled" and never["started_at"] is None and never["progress"]["step"] == 0
    assert_error(client.post(f"/jobs/{queued['id']}/cancel"), 409, "job_finished")


def test_unreachable_hub_dataset_fails_readably(client: httpx.Client) -> None:
    body = {"base_model": "tiny-gemma", "dataset": {"hub": {"name": "Abirate/english_quotes"}},
            "hyperparameters": {"max_steps": 1}}
    job = client.post("/jobs", json=body).json()
    assert job["request"]["dataset"] == {"hub": {"name": "Abirate/english_quotes", "split": "train", "revision": None}}
    done = wait_for(client, job["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "dataset_unavailable"
    assert "Abirate/english_quotes" in done["error"]["message"] and "Traceback" not in done["error"]["message"]


def test_generate_with_unfinished_adapter_is_409(client: httpx.Client, quotes: list[dict[str, Any]]) -> None:
    job = client.post("/jobs", json=tiny_job(quotes[:4], max_steps=1000)).json()
    assert_error(client.post("/generate", json={"prompt": "Quote:", "adapter": job["id"]}), 409,
                 "adapter_not_ready", "adapter")
    client.post(f"/jobs/{job['id']}/cancel")
    wait_for(client, job["id"], timeout=60)


def test_readyz_and_healthz(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] == "ok"
    assert any(w.startswith("train@") for w in ready.json()["workers"])
    assert any(w.startswith("generate@") for w in ready.json()["workers"])


def test_readyz_names_what_is_missing(service_env: dict[str, str]) -> None:
    """An API whose queues no worker consumes (another key prefix) answers 503 naming both queues."""
    env = service_env | {"FTAAS_REDIS_PREFIX": service_env["FTAAS_REDIS_PREFIX"] + "-noworkers"}
    port = free_port()
    proc = subprocess.Popen(local(api_argv("127.0.0.1", port)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        err = assert_error(httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10), 503, "not_ready")
        assert "'train'" in err["message"] and "'generate'" in err["message"]
    finally:
        proc.terminate()
        proc.wait(10)
