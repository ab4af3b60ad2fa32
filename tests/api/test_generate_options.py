"""``n``, ``logprobs`` and ``echo`` of ``POST /generate`` through the real service (API, Celery, the generate
worker's engine), and the 422s that name the field. The numbers themselves are checked against a direct forward
in tests/serve/test_options.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.api.test_streaming import sse
from tests.conftest import assert_error

PROMPTS = ["Quote: Be", "Quote: Life is"]


@pytest.mark.parametrize(("body", "code", "field"), [
    ({"logprobs": 21}, "invalid_request", "logprobs"),
    ({"logprobs": -1}, "invalid_request", "logprobs"),
    ({"n": 9}, "limit_exceeded", "n"),  # above FTAAS_GENERATE_MAX_N (8)
    ({"n": 0}, "invalid_request", "n"),
    ({"prompts": ["a", "b", "c"], "n": 6}, "limit_exceeded", "n"),  # 18 rows: over FTAAS_MAX_PROMPTS (16)
    ({"max_new_tokens": 0}, "invalid_request", "max_new_tokens"),
    ({"max_new_tokens": 0, "echo": False, "logprobs": 1}, "invalid_request", "max_new_tokens"),
    ({"presence_penalty": 2.5}, "invalid_request", "presence_penalty"),
    ({"frequency_penalty": -3}, "invalid_request", "frequency_penalty"),
    ({"logit_bias": {"5": 101}}, "invalid_request", "logit_bias"),
    ({"logit_bias": {"a5": 1}}, "invalid_request", "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "invalid_request", "logit_bias"),
    ({"response_format": {"type": "xml"}}, "invalid_request", "response_format"),
    ({"response_format": {"type": "json_schema"}}, "invalid_request", "response_format"),
    ({"response_format": {"type": "json_schema", "schema": {"type": "bogus"}}}, "invalid_request",
     "response_format"),
    ({"response_format": {"type": "json_object", "strict": True}}, "invalid_request", "response_format"),
])
def test_bad_options_are_422s_naming_the_field(client: httpx.Client, body: dict[str, Any], code: str,
                                               field: str) -> None:
    assert_error(client.post("/generate", json=({} if "prompts" in body else {"prompt": "Quote: Be"}) | body),
                 422, code, field)


def test_n_logprobs_and_echo_through_the_service(client: httpx.Client) -> None:
    body = {"prompts": PROMPTS, "n": 2, "do_sample": True, "seed": 11, "max_new_tokens": 4, "logprobs": 2,
            "echo": True}
    resp = client.post("/generate", json=body, timeout=600)
    assert resp.status_code == 200, resp.text
    outputs = resp.json()["outputs"]
    assert len(outputs) == 4
    assert client.post("/generate", json=body).json()["outputs"] == outputs, "seeded: reproducible"
    for i, out in enumerate(outputs):
        lp = out["logprobs"]
        echoed = out["prompt_tokens"] - 1  # the prompt's own tokens: the tokenizer's <bos> is not echoed
        assert set(lp) == {"tokens", "token_ids", "token_logprobs", "top_logprobs", "text_offset"}
        assert all(len(v) == echoed + out["tokens"] for v in lp.values())
        assert all(p <= 0 for p in lp["token_logprobs"]) and all(len(t) == 2 for t in lp["top_logprobs"])
        assert lp["text_offset"][echoed] == len(PROMPTS[i // 2]), "generated text follows the prompt"
    assert outputs[0]["prompt_tokens"] == outputs[1]["prompt_tokens"] < outputs[2]["prompt_tokens"]
    # streamed: token events carry the output index (i * n + j), the done event the same outputs
    _, events = sse(client, body)
    done = events[-1][1]
    assert events[-1][0] == "done" and done["outputs"] == outputs
    for k, out in enumerate(outputs):
        assert "".join(d["text"] for e, d in events if e == "token" and d["index"] == k) == out["text"]
    # scoring alone: echo with max_new_tokens 0 (what evaluation harnesses send)
    score = client.post("/generate", json={"prompt": PROMPTS[1], "echo": True, "logprobs": 0, "max_new_tokens": 0})
    assert score.status_code == 200, score.text
    (only,) = score.json()["outputs"]
    assert (only["text"], only["tokens"], only["finish_reason"]) == ("", 0, "length")
    assert only["logprobs"]["token_ids"] == outputs[2]["logprobs"]["token_ids"][:only["prompt_tokens"] - 1]
    assert only["logprobs"]["token_logprobs"] == pytest.approx(
        outputs[2]["logprobs"]["token_logprobs"][:only["prompt_tokens"] - 1], abs=1e-3)
    assert all(t == {} for t in only["logprobs"]["top_logprobs"])
    plain = client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 3}).json()["outputs"]
    assert len(plain) == 1 and plain[0]["logprobs"] is None and plain[0]["prompt_tokens"] >= 2


def test_json_schema_penalties_and_bias_through_the_service(client: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 10},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["word", "count"], "additionalProperties": False}
    body = {"prompt": PROMPTS[0], "max_new_tokens": 48, "n": 4, "do_sample": True, "seed": 3,
            "response_format": {"type": "json_schema", "schema": schema}}
    resp = client.post("/generate", json=body, timeout=600)
    assert resp.status_code == 200, resp.text
    for out in resp.json()["outputs"]:
        obj = json.loads(out["text"])
        assert out["finish_reason"] == "stop" and set(obj) == {"word", "count"}, out
        assert isinstance(obj["word"], str) and len(obj["word"]) <= 10 and 0 <= obj["count"] <= 99
    _, events = sse(client, body)
    assert events[-1][0] == "done"
    assert [o["text"] for o in events[-1][1]["outputs"]] == [o["text"] for o in resp.json()["outputs"]]
    forced = client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 3, "logprobs": 0,
                                            "logit_bias": {"1000": 100}, "frequency_penalty": 0.5})
    assert forced.status_code == 200, forced.text
    assert forced.json()["outputs"][0]["logprobs"]["token_ids"] == [1000] * 3
    far = client.post("/generate", json={"prompt": PROMPTS[0], "logit_bias": {"999999999": 1}})
    assert_error(far, 422, "invalid_request")
    assert far.json()["error"]["message"].startswith("logit_bias:"), far.text
