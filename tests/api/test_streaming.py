"""Serving through the real service: SSE streaming of /generate, concurrent requests batched by the generate
worker's engine with the same outputs as one at a time, and GET /adapters."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import assert_error, tiny_job, wait_for


def sse(client: httpx.Client, body: dict[str, Any]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """(content type, [(event, data)]) of a streamed /generate."""
    events: list[tuple[str, dict[str, Any]]] = []
    with client.stream("POST", "/generate", json=body | {"stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        kind = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind:
                events.append((kind, json.loads(line[6:])))
        return resp.headers["content-type"], events


@pytest.fixture(scope="module")
def adapter(client: httpx.Client, quotes: list[dict[str, Any]]) -> str:
    job = client.post("/jobs", json=tiny_job(quotes[:8], learning_rate=1e-2, max_steps=4)).json()
    adapter = str(wait_for(client, job["id"], {"succeeded"}, timeout=900)["adapter"])
    warm = client.post("/generate", json={"prompt": "Quote:", "adapter": adapter, "max_new_tokens": 1}, timeout=600)
    assert warm.status_code == 200, warm.text  # the worker has loaded the base model (slow on a busy CPU)
    return adapter


def test_stream_sends_pieces_then_the_response(client: httpx.Client, adapter: str) -> None:
    body = {"prompts": ["Quote: Be", "Quote: Life is"], "adapter": adapter, "max_new_tokens": 8}
    whole = client.post("/generate", json=body)
    assert whole.status_code == 200, whole.text
    ctype, events = sse(client, body)
    assert ctype.startswith("text/event-stream")
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"} and len(kinds) > 3, kinds
    done = events[-1][1]
    assert [o["text"] for o in done["outputs"]] == [o["text"] for o in whole.json()["outputs"]]
    for i, out in enumerate(done["outputs"]):
        assert "".join(d["text"] for k, d in events if k == "token" and d["index"] == i) == out["text"]
        assert out["tokens"] >= 1
    assert {"queue_ms", "load_ms", "ttft_ms", "generate_ms", "total_ms"} <= set(done["timing"])


def test_stream_errors(client: httpx.Client, adapter: str) -> None:
    # checked before streaming starts: the ordinary envelope
    assert_error(client.post("/generate", json={"prompt": "x", "adapter": "job_" + "0" * 22, "stream": True}),
                 404, "adapter_not_found", "adapter")
    # found by the worker: an error event
    _, events = sse(client, {"prompt": "1234567890" * 400, "max_new_tokens": 64})
    assert events == [("error", {"error": {"code": "prompt_too_long", "field": None,
                                           "message": events[0][1]["error"]["message"]}})], events
    resp = client.post("/generate", json={"prompt": "1234567890" * 400, "max_new_tokens": 64})
    assert_error(resp, 422, "prompt_too_long")


def test_concurrent_requests_match_sequential(client: httpx.Client, adapter: str) -> None:
    bodies = [{"prompt": p, "max_new_tokens": 6} | ({"adapter": adapter} if i % 2 else {})
              for i, p in enumerate(["Quote: Be", "Quote: Life is", "Quote: The only", "Quote: Stay hungry"])]
    sequential = [client.post("/generate", json=b).json()["outputs"][0]["text"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: client.post("/generate", json=b).json()["outputs"][0]["text"], bodies))
    assert together == sequential


def test_adapters_lists_what_the_worker_loaded(client: httpx.Client, adapter: str) -> None:
    assert client.post("/generate", json={"prompt": "Quote: Be", "adapter": adapter, "max_new_tokens": 2}
                       ).status_code == 200
    deadline = time.monotonic() + 20
    while True:
        data = client.get("/adapters").json()["data"]
        if any(adapter in b["adapters"] for b in data):
            break
        assert time.monotonic() < deadline, data
        time.sleep(0.5)
    base = next(b for b in data if adapter in b["adapters"])
    assert base["base_model"] == "tiny-gemma" and base["worker"] and base["adapter_slots"] >= 1
