"""Structured output on ``/v1`` with the official client (strict types) against the real service: chat's
``response_format`` json_schema and json_object, completions' (sent as an extra field, which the client's
``completions.create`` does not declare), and penalties and ``logit_bias`` honoured, not refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from tests.api.test_openai_compat import strict_client

USER: list[Any] = [{"role": "user", "content": "Name a person and their age as JSON."}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def oai(service: str) -> Iterator[OpenAI]:
    with strict_client(service) as c:
        yield c


def _valid(obj: Any) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "age"} and isinstance(obj["name"], str)
            and len(obj["name"]) <= 12 and type(obj["age"]) is int and 0 <= obj["age"] <= 120)


def test_chat_json_schema(oai: OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    reply = oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=64, temperature=1, seed=9,
                                        n=4, response_format=fmt)
    assert len(reply.choices) == 4
    for c in reply.choices:
        assert c.finish_reason == "stop" and c.message.content is not None
        assert _valid(json.loads(c.message.content)), c.message.content
    assert len({c.message.content for c in reply.choices}) > 1, "seeded choices differ"
    streamed = oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=64, temperature=1, seed=9,
                                           response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == reply.choices[0].message.content, "streamed: the same JSON"
    greedy = oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=64, temperature=0,
                                         response_format=fmt)
    assert _valid(json.loads(greedy.choices[0].message.content or ""))


def test_json_object_and_completions(oai: OpenAI) -> None:
    # a random model writes endless JSON: '"' and '}' favoured (where the grammar allows them) close it
    favoured = {"236775": 100, "236783": 100}
    reply = oai.chat.completions.create(model="tiny-gemma", messages=USER, max_tokens=64, temperature=1, seed=2,
                                        response_format={"type": "json_object"}, logit_bias=favoured)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    done = oai.completions.create(model="tiny-gemma", prompt="Person:", max_tokens=64, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "person", "schema": SCHEMA}}})
    assert done.choices[0].finish_reason == "stop" and _valid(json.loads(done.choices[0].text))


def test_penalties_and_bias_are_honoured(oai: OpenAI) -> None:
    plain = oai.completions.create(model="tiny-gemma", prompt="Quote: Be", max_tokens=24, temperature=0)
    penalised = oai.completions.create(model="tiny-gemma", prompt="Quote: Be", max_tokens=24, temperature=0,
                                       frequency_penalty=2, presence_penalty=1)
    assert penalised.choices[0].text != plain.choices[0].text
    forced = oai.completions.create(model="tiny-gemma", prompt="Quote: Be", max_tokens=3, temperature=0,
                                    logit_bias={"1000": 100}, logprobs=0)
    lp = forced.choices[0].logprobs
    assert lp is not None and lp.tokens is not None
    assert len(lp.tokens) == 3 and lp.tokens == [lp.tokens[0]] * 3, "+100: the same token each time"
