"""``/v1`` completions and chat completions over the generate worker, with the official client (strict types):
token-by-token streaming, usage, ``n``, ``best_of``, logprobs and ``echo`` (the loglikelihood request evaluation
harnesses send)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import Completion

from tests.api.test_openai_compat import strict_client

USER: list[Any] = [{"role": "user", "content": "Give me a quote."}]
PROMPTS = ["Quote: Be", "Quote: The only thing we have to fear is"]


@pytest.fixture(scope="module")
def oai(service: str) -> Iterator[OpenAI]:
    with strict_client(service) as c:
        yield c


def _sse(service: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a streamed /v1/completions answer, read off the wire (the official client's Completion
    type does not allow the finish_reason null that OpenAI, and ftaas, send until a choice's last chunk)."""
    chunks, done = [], False
    with httpx.stream("POST", f"{service}/v1/completions", json=body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert not done, "nothing after [DONE]"
                if line == "data: [DONE]":
                    done = True
                else:
                    chunks.append(json.loads(line.removeprefix("data: ")))
    assert done
    for c in chunks:  # every chunk is the client's type but for that null
        Completion.model_validate(c | {"choices": [ch | {"finish_reason": ch["finish_reason"] or "stop"}
                                                   for ch in c["choices"]]}, strict=False)
    return chunks


def test_usage_and_n(oai: OpenAI) -> None:
    one = [oai.completions.create(model="tiny-gemma", prompt=p, max_tokens=3, temperature=0) for p in PROMPTS]
    prompt_tokens = [c.usage.prompt_tokens for c in one]  # type: ignore[union-attr]
    assert prompt_tokens[0] > 0 and prompt_tokens[1] > prompt_tokens[0]
    many = oai.completions.create(model="tiny-gemma", prompt=PROMPTS, max_tokens=3, temperature=1, seed=5, n=3,
                                  best_of=3)
    assert [c.index for c in many.choices] == list(range(6))
    assert many.usage and many.usage.prompt_tokens == sum(prompt_tokens)  # each prompt counted once
    assert many.usage.total_tokens == many.usage.prompt_tokens + many.usage.completion_tokens
    greedy = oai.completions.create(model="tiny-gemma", prompt=PROMPTS, max_tokens=3, temperature=0, n=2)
    texts = [c.text for c in greedy.choices]  # prompt-major: prompt i's choices are i*n .. i*n+n-1
    assert texts == [one[0].choices[0].text] * 2 + [one[1].choices[0].text] * 2

    chat = oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=3, temperature=1, seed=2, n=2)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage and chat.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model="tiny-gemma", prompt="Quote", max_tokens=2, n=9)
    assert bad.value.param == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=2, n=0)
    assert bad.value.param == "n"


def test_completion_streams_token_by_token(oai: OpenAI, service: str) -> None:
    body = {"model": "tiny-gemma", "prompt": PROMPTS, "max_tokens": 8, "temperature": 0, "n": 2}
    whole = oai.completions.create(**body)  # type: ignore[call-overload]
    chunks = _sse(service, body | {"stream_options": {"include_usage": True}})
    pieces: dict[int, list[str]] = defaultdict(list)
    finish: dict[int, str] = {}
    for c in chunks[:-1]:
        assert len(c["choices"]) == 1 and c.get("usage") is None
        ch = c["choices"][0]
        assert ch["index"] not in finish, "nothing after a choice's finish_reason"
        pieces[ch["index"]].append(ch["text"])
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert sorted(pieces) == [0, 1, 2, 3]
    for i, choice in enumerate(whole.choices):
        assert "".join(pieces[i]) == choice.text and finish[i] == choice.finish_reason
    assert max(len([p for p in ps if p]) for ps in pieces.values()) > 1, pieces  # not one chunk of the whole text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)  # type: ignore[union-attr]

    echoed = _sse(service, {"model": "tiny-gemma", "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0,
                            "echo": True})
    plain = oai.completions.create(model="tiny-gemma", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert echoed[0]["choices"][0]["text"] == PROMPTS[0]  # the prompt first
    assert "".join(c["choices"][0]["text"] for c in echoed) == PROMPTS[0] + plain.choices[0].text


def test_chat_streams_token_by_token(oai: OpenAI) -> None:
    whole = oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=8, temperature=0)
    chunks = list(oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == whole.choices[0].message.content and len(texts) > 1, texts
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert ends == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    two = list(oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=4, temperature=0, n=2,
                                           stream=True))
    roles = [c.choices[0].index for c in two if c.choices[0].delta.role == "assistant"]
    ended = [c.choices[0].index for c in two if c.choices[0].finish_reason]
    assert roles == [0, 1] and sorted(ended) == [0, 1]
    short = oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=4, temperature=0)
    for j in (0, 1):  # greedy: both choices are the same reply
        text = "".join(c.choices[0].delta.content or "" for c in two if c.choices[0].index == j)
        assert text == short.choices[0].message.content


def test_completion_logprobs(oai: OpenAI) -> None:
    done = oai.completions.create(model="tiny-gemma", prompt="Quote: Be", max_tokens=5, temperature=0, logprobs=3)
    choice = done.choices[0]
    lp = choice.logprobs
    assert lp and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == done.usage.completion_tokens  # type: ignore[union-attr]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob, abs=1e-3)  # greedy: the likeliest
    none = oai.completions.create(model="tiny-gemma", prompt="Quote: Be", max_tokens=5, temperature=0, logprobs=0)
    assert none.choices[0].logprobs and none.choices[0].logprobs.top_logprobs == [{}] * len(lp.tokens)
    assert none.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-3)


def test_echo_scores_the_prompt(oai: OpenAI) -> None:
    """What lm-evaluation-harness sends for a loglikelihood: echo, max_tokens 0, logprobs. The tokenizer's <bos> is
    not echoed, so every echoed token has a score (OpenAI answers null for a first token nothing precedes)."""
    prompt = "Quote: The only thing we have to fear is fear itself"
    raw = oai.completions.with_raw_response.create(model="tiny-gemma", prompt=prompt, max_tokens=0, echo=True,
                                                   logprobs=1, temperature=0)
    body = raw.http_response.json()
    choice, usage = body["choices"][0], body["usage"]
    assert choice["text"] == prompt and usage["completion_tokens"] == 0 and usage["prompt_tokens"] > 3
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == usage["prompt_tokens"] - 1
    assert all(x <= 0 for x in lp["token_logprobs"]) and lp["text_offset"] == sorted(lp["text_offset"])
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"][-1] < len(prompt)

    # echo with generated tokens: the prompt's entries, then the completion's, which match a plain request's
    both = oai.completions.with_raw_response.create(model="tiny-gemma", prompt=prompt, max_tokens=3, echo=True,
                                                    logprobs=1, temperature=0).http_response.json()
    plain = oai.completions.create(model="tiny-gemma", prompt=prompt, max_tokens=3, logprobs=1, temperature=0)
    assert both["choices"][0]["text"] == prompt + plain.choices[0].text
    n_prompt = usage["prompt_tokens"] - 1
    assert both["choices"][0]["logprobs"]["token_logprobs"][:n_prompt] == pytest.approx(
        lp["token_logprobs"], abs=1e-3)
    assert both["choices"][0]["logprobs"]["token_logprobs"][n_prompt:] == pytest.approx(
        plain.choices[0].logprobs.token_logprobs, abs=1e-3)  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model="tiny-gemma", prompt=prompt, max_tokens=0)
    assert bad.value.param == "max_tokens"


def test_chat_logprobs(oai: OpenAI) -> None:
    done = oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    choice = done.choices[0]
    assert choice.logprobs and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == done.usage.completion_tokens  # type: ignore[union-attr]
    for t in content:
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-3)
    chunks = list(oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in content]
    bare = oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=4, temperature=0, logprobs=True)
    assert bare.choices[0].logprobs and [t.top_logprobs for t in bare.choices[0].logprobs.content or []] == [
        []] * len(content)
