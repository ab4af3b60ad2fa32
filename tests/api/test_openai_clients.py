"""Real client code against the running service's ``/v1`` (issue 20): LangChain's ``ChatOpenAI`` invoking and
streaming a served adapter, and a chat adapter trained on the real gemma-3-270m whose replies end at its turn."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from openai import OpenAI

from tests.api.test_openai_compat import strict_client
from tests.conftest import tiny_job, wait_for

#: A terse geography bot: short answers, each ending the assistant's turn.
SYSTEM = "You are a terse geography bot. Answer with the city only."
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"),
            ("Canada", "Ottawa"), ("Spain", "Madrid"), ("Kenya", "Nairobi"), ("Chile", "Santiago")]
CHAT_ROWS = [{"messages": [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": f"What is the capital of {country}?"},
                           {"role": "assistant", "content": f"{city}."}]} for country, city in CAPITALS]


@pytest.fixture(scope="module")
def oai(service: str) -> Iterator[OpenAI]:
    with strict_client(service) as c:
        yield c


def _fine_tuned_model(oai: OpenAI, client: httpx.Client, body: dict[str, Any], timeout: float) -> str:
    """Train ``body`` through ``POST /jobs`` to success; its ``/v1`` model name."""
    resp = client.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    done = wait_for(client, job_id, timeout=timeout)
    assert done["status"] == "succeeded", done["error"]
    model = oai.fine_tuning.jobs.retrieve(job_id).fine_tuned_model
    assert model and model.endswith(job_id)
    return model


@pytest.fixture(scope="module")
def tiny_adapter(oai: OpenAI, client: httpx.Client, quotes: list[dict[str, Any]]) -> str:
    """A tiny-gemma adapter (3 steps on quotes): seconds to train, served like any other."""
    return _fine_tuned_model(oai, client, tiny_job(quotes[:8]) | {"name": "langchain"}, timeout=300)


@pytest.fixture(scope="module")
def chat_adapter(oai: OpenAI, client: httpx.Client) -> str:
    """A messages-format adapter on the real gemma-3-270m: the pretrained base never ends a turn by itself
    (it runs on to the next question), so ending at ``<end_of_turn>`` is what training teaches. These settings (the
    first tried) took the loss from 8.9 to 0.7 in 12 steps of about 30 s each on a busy 2-core CPU."""
    body = {"base_model": "gemma-3-270m", "name": "capitals", "dataset": {"rows": CHAT_ROWS},
            "hyperparameters": {"max_steps": 12, "learning_rate": 1e-3, "warmup_steps": 0, "batch_size": 4,
                                "gradient_accumulation_steps": 1, "max_length": 64, "seed": 5,
                                "gradient_checkpointing": False, "quantization": "none"}}
    return _fine_tuned_model(oai, client, body, timeout=1200)


def test_langchain_invoke_and_stream(service: str, tiny_adapter: str) -> None:
    started = time.monotonic()
    llm = ChatOpenAI(base_url=f"{service}/v1", api_key="x", model=tiny_adapter,  # type: ignore[arg-type]
                     temperature=0, max_tokens=12, max_retries=0, timeout=120, stream_usage=True)  # type: ignore[call-arg]
    prompt = [("system", "You answer with a quote."), ("user", "Give me a quote.")]
    msg = llm.invoke(prompt)
    assert isinstance(msg.content, str) and msg.content, msg
    assert msg.response_metadata["model_name"] == tiny_adapter
    assert msg.response_metadata["finish_reason"] in {"stop", "length"}
    usage = msg.usage_metadata
    assert usage and usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 12
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    chunks = list(llm.stream(prompt))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    pieces = [c.content for c in chunks if c.content]
    assert len(pieces) > 1, pieces  # streamed as generated, not one chunk of the whole reply
    assert "".join(str(p) for p in pieces) == msg.content  # greedy: the same reply
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c
    assert whole.usage_metadata == usage  # include_usage honoured: the same counts as the whole answer
    assert whole.response_metadata.get("finish_reason") == msg.response_metadata["finish_reason"]

    # LangChain's async path and its batch (concurrent requests to one engine) give the same greedy reply
    assert [m.content for m in llm.batch([prompt, prompt])] == [msg.content, msg.content]
    print(f"langchain test: {time.monotonic() - started:.1f} s")


def test_chat_adapter_ends_its_turn(oai: OpenAI, client: httpx.Client, chat_adapter: str) -> None:
    """The engine stops on every end token (worker.decoding.end_token_ids), ``<end_of_turn>`` among them. With
    end_token_ids cut to the tokenizer's ``<eos>`` this failed (checked 2026-12-01): "Lima." lines on to 64 tokens,
    ``length``."""
    started = time.monotonic()
    for country in ("Peru", "Germany"):  # not in the training rows
        reply = oai.chat.completions.create(model=chat_adapter, max_tokens=64, temperature=0, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is the capital of {country}?"}])
        choice = reply.choices[0]
        text = choice.message.content or ""
        assert choice.finish_reason == "stop", (country, text)
        assert reply.usage and reply.usage.completion_tokens < 64
        assert text.strip() and "\n" not in text.strip(), text  # one short answer, no next turn after it
        for marker in ("<end_of_turn>", "<start_of_turn>", "end_of_turn", "user", "capital"):
            assert marker not in text, (marker, text)
    streamed = list(oai.chat.completions.create(model=chat_adapter, max_tokens=64, temperature=0, stream=True,
                                                messages=[{"role": "system", "content": SYSTEM},
                                                          {"role": "user", "content": "What is the capital of Peru?"}]))
    assert [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason] == ["stop"]
    # the job's own samples after training end at the turn too (worker/train/samples.py: the same end tokens)
    samples = client.get(f"/jobs/{chat_adapter.rsplit(':', 1)[-1]}").json()["evaluation"]["samples"]
    assert samples and all(s["after"].strip() and "\n" not in s["after"].strip() for s in samples), samples
    print(f"chat stop test (after training): {time.monotonic() - started:.1f} s")
