"""What wrapper libraries send to ``/v1`` (default and no-op values are served, anything ftaas does not do is a 400
naming the field), and ``/v1`` errors in OpenAI's shape and words, with the official client (strict types)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.api.test_openai_compat import strict_client
from tests.conftest import assert_error

USER: list[Any] = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def oai(service: str) -> Iterator[OpenAI]:
    with strict_client(service) as c:
        yield c


def _message(e: openai.APIStatusError) -> str:
    assert isinstance(e.body, dict)
    return str(e.body["message"])


def _openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def test_noop_values_are_served(oai: OpenAI) -> None:
    done = oai.completions.create(model="tiny-gemma", prompt="Quote", max_tokens=2, temperature=0,
                                  presence_penalty=0, frequency_penalty=0, logit_bias={}, user="u-1", best_of=1,
                                  n=1, echo=False, suffix="", seed=1, logprobs=None)
    assert len(done.choices) == 1
    assert oai.completions.create(model="tiny-gemma", prompt="Quote", max_tokens=2, temperature=0,
                                  logit_bias=None).choices[0].text == done.choices[0].text
    chat = oai.chat.completions.create(
        model="tiny-gemma", messages=USER, max_tokens=2, temperature=0, presence_penalty=0, frequency_penalty=0,
        logit_bias={}, store=False, metadata={"app": "tests"}, user="u-1", parallel_tool_calls=True,
        service_tier="auto", response_format={"type": "text"}, tool_choice="none", top_logprobs=None,
        logprobs=False, n=1, safety_identifier="s-1", prompt_cache_key="k", modalities=["text"], tools=[])
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].logprobs is None
    streamed = list(oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=2, temperature=0,
                                                stream=True, stream_options={"include_usage": False},
                                                presence_penalty=0, logit_bias=None))
    assert streamed and all(c.usage is None for c in streamed)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


@pytest.mark.parametrize(("route", "extra", "param"), [
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"best_of": 2, "n": 3}, "best_of"),
    ("completions", {"suffix": " the end"}, "suffix"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "bogus"}}}}, "response_format"),
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat", {"logit_bias": {"1": 101}}, "logit_bias"),
    ("chat", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("chat", {"store": True}, "store"),
    ("chat", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
])
def test_what_ftaas_does_not_do_or_cannot_read_is_a_400_naming_it(oai: OpenAI, route: str, extra: dict[str, Any],
                                                     param: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        if route == "completions":
            oai.completions.create(model="tiny-gemma", prompt="Quote", max_tokens=2, **extra)
        else:
            oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=2, **extra)
    assert bad.value.param == param and param in bad.value.message, bad.value.body


def test_openai_error_words(service: str, oai: OpenAI, client: httpx.Client) -> None:
    err = _openai_error(httpx.get(f"{service}/v1/nowhere"), 404)
    assert err["message"] == "Invalid URL (GET /v1/nowhere)" and err["type"] == "invalid_request_error"
    err = _openai_error(httpx.delete(f"{service}/v1/models"), 405)
    assert err["message"] == "Invalid method for URL (DELETE /v1/models)"
    err = _openai_error(httpx.post(f"{service}/v1/completions", json={"model": "tiny-gemma", "prompt": "x",
                                                                     "bogus": 1}), 400)
    assert err["message"] == "Unrecognized request argument supplied: bogus" and err["param"] == "bogus"
    err = _openai_error(httpx.post(f"{service}/v1/chat/completions", json={"messages": USER}), 400)
    assert err["message"] == "Missing required parameter: 'model'." and err["param"] == "model"
    err = _openai_error(httpx.post(f"{service}/v1/completions", content=b"{", headers={
        "content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"

    for file_id in ("file-abc123", "ds_" + "0" * 22):
        with pytest.raises(openai.NotFoundError) as nf:
            oai.files.retrieve(file_id)
        assert _message(nf.value) == f"No such file: {file_id}", nf.value.body
    with pytest.raises(openai.NotFoundError) as nf:
        oai.files.delete("file-abc123")
    assert _message(nf.value) == "No such file: file-abc123"
    with pytest.raises(openai.NotFoundError) as nf:
        oai.fine_tuning.jobs.create(model="tiny-gemma", training_file="file-abc123")
    assert _message(nf.value) == "No such file: file-abc123" and nf.value.param == "training_file"
    for job_id in ("ftjob-abc123", "job_" + "0" * 22):
        with pytest.raises(openai.NotFoundError) as nf:
            oai.fine_tuning.jobs.retrieve(job_id)
        assert _message(nf.value) == f"No such fine-tuning job: {job_id}"
        with pytest.raises(openai.NotFoundError):
            oai.fine_tuning.jobs.cancel(job_id)
        with pytest.raises(openai.NotFoundError):
            oai.fine_tuning.jobs.list_events(job_id)
        with pytest.raises(openai.NotFoundError):
            oai.fine_tuning.jobs.checkpoints.list(job_id)

    # the native routes keep ftaas's envelope
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.delete("/jobs"), 405, "method_not_allowed")
    assert_error(client.post("/generate", json={"prompt": "x", "bogus": 1}), 422, "invalid_request", "bogus")
