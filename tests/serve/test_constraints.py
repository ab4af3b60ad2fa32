"""The engine's per-row logit controls on tiny-gemma in fp32 (no Celery): JSON output through a grammar
(``response_format``), ``logit_bias`` and the presence / frequency penalties, each row with its own settings in a
shared batch, and rows without any of them decoding exactly as alone."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.core.errors import UserFacingError
from app.core.settings import Settings
from tests.serve.test_engine import PROMPTS, req
from worker.serve.pool import EnginePool

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["name", "age"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "schema": SCHEMA}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> EnginePool:
    return EnginePool(Settings(data_dir=tmp_path_factory.mktemp("constraints"), device="cpu"))


def fp32(prompt: str | list[str], **kw: Any) -> dict[str, Any]:
    return req(prompt, None, quantization="none", **kw)


def valid(obj: Any) -> bool:
    """SCHEMA checked by hand (jsonschema is not installed)."""
    return (isinstance(obj, dict) and set(obj) == {"name", "age"} and isinstance(obj["name"], str)
            and len(obj["name"]) <= 12 and isinstance(obj["age"], int) and not isinstance(obj["age"], bool)
            and 0 <= obj["age"] <= 999)


def test_fifty_sampled_generations_follow_the_schema(pool: EnginePool) -> None:
    futures = [pool.submit(fp32(PROMPTS[i % 3], n=10, do_sample=True, seed=100 * i, max_new_tokens=48,
                                response_format=JSON_SCHEMA)) for i in range(5)]
    outputs = [o for f in futures for o in f.result()["outputs"]]
    assert len(outputs) == 50
    for o in outputs:
        assert o["finish_reason"] == "stop", o
        assert valid(json.loads(o["text"])), o["text"]
    assert len({o["text"] for o in outputs}) > 40, "seeded rows differ"
    engine = pool._base("tiny-gemma", "none")
    compiled = engine.grammars.compiled
    pool.generate(fp32(PROMPTS[0], max_new_tokens=48, response_format=JSON_SCHEMA))
    assert engine.grammars.compiled == compiled, "the schema compiled once (cached)"


def test_json_object_parses_and_plain_rows_decode_as_alone(pool: EnginePool) -> None:
    tok = pool._base("tiny-gemma", "none").tok
    favoured = {str(tok.convert_tokens_to_ids(t)): 100 for t in ('"', "}")}
    alone = pool.generate(fp32(PROMPTS[:2], max_new_tokens=16))["outputs"]
    # a random model writes endless JSON: '"' and '}' favoured (where the grammar allows them) close it
    mixed = [pool.submit(fp32(PROMPTS[:2], max_new_tokens=16)),
             pool.submit(fp32(PROMPTS[2], max_new_tokens=64, n=3, do_sample=True, seed=5, logit_bias=favoured,
                              response_format={"type": "json_object"})),
             pool.submit(fp32(PROMPTS[0], max_new_tokens=16, logit_bias={"1000": 5.0}, frequency_penalty=1.0))]
    assert mixed[0].result()["outputs"] == alone, "greedy rows beside constrained ones: the same as alone"
    for o in mixed[1].result()["outputs"]:
        assert o["finish_reason"] == "stop" and isinstance(json.loads(o["text"]), dict), o
    assert mixed[2].result()["outputs"][0]["text"] != alone[0]["text"]


def test_logit_bias_forces_and_bans(pool: EnginePool) -> None:
    tok = pool._base("tiny-gemma", "none").tok
    forced = pool.generate(fp32(PROMPTS[0], max_new_tokens=6, logprobs=0, logit_bias={"1000": 100}))["outputs"][0]
    assert forced["logprobs"]["token_ids"] == [1000] * 6 and forced["text"] == tok.decode([1000] * 6)
    assert all(p < 0 for p in forced["logprobs"]["token_logprobs"]), "logprobs stay the raw model's"
    free = pool.generate(fp32(PROMPTS[0], max_new_tokens=8, logprobs=0))["outputs"][0]["logprobs"]["token_ids"]
    banned = {str(t): -100 for t in set(free)}
    other = pool.generate(fp32(PROMPTS[0], max_new_tokens=8, logprobs=0, logit_bias=banned))["outputs"][0]
    assert other["tokens"] == 8 and not set(other["logprobs"]["token_ids"]) & set(free)


def test_frequency_and_presence_penalties_cut_repeats(pool: EnginePool) -> None:
    def repeats(**kw: Any) -> int:
        out = pool.generate(fp32(PROMPTS[1], max_new_tokens=40, logprobs=0, **kw))["outputs"][0]
        ids = out["logprobs"]["token_ids"]
        return len(ids) - len(set(ids))

    plain = repeats()
    assert plain >= 5, "the greedy row repeats itself"
    assert repeats(frequency_penalty=2.0) < plain / 2
    assert repeats(presence_penalty=2.0) < plain / 2
    assert repeats(frequency_penalty=-2.0) >= plain, "a negative penalty repeats as much or more"


def test_bad_schema_and_bias_fail_the_request(pool: EnginePool) -> None:
    with pytest.raises(UserFacingError, match="response_format"):
        pool.generate(fp32(PROMPTS[0], response_format={"type": "json_schema", "schema": {"type": "bogus"}}))
    with pytest.raises(UserFacingError, match="logit_bias"):
        pool.generate(fp32(PROMPTS[0], logit_bias={"99999999": 1}))
    assert pool.generate(fp32(PROMPTS[0], max_new_tokens=2))["outputs"][0]["tokens"] == 2, "the engine serves on"
