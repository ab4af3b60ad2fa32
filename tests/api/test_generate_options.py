"""``n``, ``logprobs`` and ``echo`` of ``POST /generate`` through the real service (API, Celery, the generate
worker's engine), and the 422s that name the field. The numbers themselves are checked against a direct forward
in tests/serve/test_options.py."""

from __future__ import annotations

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
        n_entries = out["prompt_tokens"] + out["tokens"]
        assert set(lp) == {"tokens", "token_ids", "token_logprobs", "top_logprobs", "text_offset"}
        assert all(len(v) == n_entries for v in lp.values())
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(p <= 0 for p in lp["token_logprobs"][1:]) and all(len(t) == 2 for t in lp["top_logprobs"][1:])
        assert lp["text_offset"][out["prompt_tokens"]] == len(PROMPTS[i // 2]), "generated text follows the prompt"
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
    assert only["logprobs"]["token_ids"] == outputs[2]["logprobs"]["token_ids"][:only["prompt_tokens"]]
    assert only["logprobs"]["token_logprobs"] == pytest.approx(
        outputs[2]["logprobs"]["token_logprobs"][:only["prompt_tokens"]], abs=1e-3)
    assert all(t == {} for t in only["logprobs"]["top_logprobs"][1:])
    plain = client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 3}).json()["outputs"]
    assert len(plain) == 1 and plain[0]["logprobs"] is None and plain[0]["prompt_tokens"] >= 2
