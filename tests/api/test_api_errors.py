"""Bad input to every endpoint gets a 4xx in the one error envelope, over real HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import assert_error, tiny_job

ROWS = [{"quote": "Be yourself.", "author": "Oscar Wilde"}]


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"base_model": "tiny-gemma"}, 422, "invalid_request", "dataset"),
        ({"dataset": {"rows": []}}, 422, "invalid_request", "dataset.rows"),
        ({"dataset": {}}, 422, "invalid_request", "dataset"),
        ({"dataset": {"rows": ROWS, "hub": {"name": "a/b"}}}, 422, "invalid_request", "dataset"),
        ({"dataset": {"rows": [{"text": "x"}]}, "template": "{quote}"}, 422, "template_field_missing", "template"),
        ({"dataset": {"rows": [{"foo": "x"}]}}, 422, "template_field_missing", "template"),
        ({"dataset": {"rows": [{"prompt": "x"}]}, "format": "prompt_completion"}, 422, "dataset_columns_missing",
         "dataset.rows"),
        ({"dataset": {"rows": [{"quote": "", "author": None}]}}, 422, "empty_dataset", "dataset.rows"),
        ({"dataset": {"rows": [{"messages": [{"role": "robot", "content": "x"}]}]}}, 422, "invalid_request",
         "dataset.rows.0.messages.0.role"),
        ({"dataset": {"rows": ROWS}, "validation": {"fraction": 0.9}}, 422, "invalid_request", "validation.fraction"),
        ({"dataset": {"rows": ROWS}, "sample_prompts": ["x"] * 9}, 422, "invalid_request", "sample_prompts"),
        ({"dataset": {"rows": ROWS}, "template": "{quote.__class__}"}, 422, "invalid_request", "template"),
        ({"dataset": {"rows": ROWS}, "template": "no fields"}, 422, "invalid_request", "template"),
        (tiny_job(ROWS, max_steps=0), 422, "invalid_request", "hyperparameters.max_steps"),
        (tiny_job(ROWS, max_steps=10**9), 422, "invalid_request", "hyperparameters.max_steps"),
        (tiny_job(ROWS, learning_rate=-1), 422, "invalid_request", "hyperparameters.learning_rate"),
        (tiny_job(ROWS, lora={"target_modules": ["lm_head"]}), 422, "invalid_request",
         "hyperparameters.lora.target_modules.0"),
        (tiny_job(ROWS, bogus=1), 422, "invalid_request", "hyperparameters.bogus"),
        ({"base_model": "no-such-model", "dataset": {"rows": ROWS}}, 422, "unknown_base_model", "base_model"),
        ({"dataset": {"rows": ROWS}, "metadata": {"k": "v" * 600}}, 422, "invalid_request", "metadata.k"),
    ],
)
def test_create_job_rejects(client: httpx.Client, body: dict[str, Any], status: int, code: str, field: str) -> None:
    err = assert_error(client.post("/jobs", json=body), status, code, field)
    if code == "unknown_base_model":
        assert "tiny-gemma" in err["message"] and "gemma-3-270m" in err["message"]
    if code == "template_field_missing":
        assert "'quote'" in err["message"] and "dataset.rows" in err["message"]


def test_malformed_json_and_wrong_method(client: httpx.Client) -> None:
    resp = client.post("/jobs", content=b'{"dataset": ', headers={"content-type": "application/json"})
    assert_error(resp, 400, "invalid_json")
    assert_error(client.delete("/jobs"), 405, "method_not_allowed")
    assert_error(client.get("/nowhere"), 404, "not_found")


def test_unknown_job_and_list_params(client: httpx.Client) -> None:
    assert_error(client.get("/jobs/job_0000000000000000000000"), 404, "job_not_found")
    assert_error(client.post("/jobs/job_0000000000000000000000/cancel"), 404, "job_not_found")
    job_id = client.post("/jobs", json=tiny_job(ROWS, max_steps=1)).json()["id"]
    for suffix in (":payload", ":events", ":metrics"):  # other keys of the job store are no jobs
        assert_error(client.get(f"/jobs/{job_id}{suffix}"), 404, "job_not_found")
        assert_error(client.post(f"/jobs/{job_id}{suffix}/cancel"), 404, "job_not_found")
    assert_error(client.get("/jobs", params={"limit": 0}), 422, "invalid_request", "limit")
    assert_error(client.get("/jobs", params={"status": "exploded"}), 422, "invalid_request", "status")
    assert_error(client.get("/jobs", params={"after": "../../etc"}), 422, "invalid_request", "after")


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({}, 422, "invalid_request", None),
        ({"prompt": "a", "prompts": ["b"]}, 422, "invalid_request", None),
        ({"prompt": "x" * 4001}, 422, "invalid_request", "prompt"),
        ({"prompts": ["a"] * 17}, 422, "invalid_request", "prompts"),
        ({"prompt": "a", "max_new_tokens": 0}, 422, "invalid_request", "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": 100_000}, 422, "invalid_request", "max_new_tokens"),
        ({"prompt": "a", "temperature": 0}, 422, "invalid_request", "temperature"),
        ({"prompt": "a", "adapter": "../../etc/passwd"}, 422, "invalid_request", "adapter"),
        ({"prompt": "a", "adapter": "job_0000000000000000000000"}, 404, "adapter_not_found", "adapter"),
        ({"prompt": "a", "base_model": "nope"}, 422, "unknown_base_model", "base_model"),
    ],
)
def test_generate_rejects(client: httpx.Client, body: dict[str, Any], status: int, code: str,
                          field: str | None) -> None:
    assert_error(client.post("/generate", json=body), status, code, field)


def test_openapi_documents_bounds(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    hp = schemas["Hyperparameters"]["properties"]
    assert hp["max_steps"]["minimum"] == 1 and hp["max_steps"]["maximum"] == 10_000
    assert hp["max_steps"]["default"] == 100 and hp["learning_rate"]["default"] == 2e-4
    assert schemas["GenerateRequest"]["properties"]["max_new_tokens"]["maximum"] == 1024
    assert schemas["JobCreate"]["properties"]["template"]["default"] == "Quote: {quote}\nAuthor: {author}"


def test_validation_dataset_is_checked_before_queueing(client: httpx.Client) -> None:
    body = {"dataset": {"rows": ROWS}, "validation": {"dataset": {"id": "ds_" + "0" * 22}}}
    assert_error(client.post("/jobs", json=body), 404, "dataset_not_found", "validation.dataset.id")
    body = {"dataset": {"rows": ROWS}, "validation": {"dataset": {"rows": [{"quote": "only a quote"}]}}}
    assert_error(client.post("/jobs", json=body), 422, "template_field_missing", "template")
