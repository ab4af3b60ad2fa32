"""The hub token never leaks: a canary ``HF_TOKEN`` in every process of the keyed service (tests/keyed.py)
must be absent from every response, every value under its Redis prefix and the api and worker logs,
after jobs (hub model and hub dataset ones, which the worker tries to load with the token offline),
generations and event streams. Also: the token file setting is read, and settings never show the token."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.core.settings import Settings
from tests.conftest import TERMINAL
from tests.keyed import Keyed

ROWS = [{"quote": f"Words {i}.", "author": "B"} for i in range(4)]
HP = {"max_steps": 1, "batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 16,
      "gradient_checkpointing": False}


def _values(r: redis.Redis, key: bytes) -> list[bytes]:
    """Every value stored at ``key``, whatever its type."""
    kind = r.type(key)
    if kind == b"string":
        return [r.get(key) or b""]
    if kind == b"hash":
        return [b for kv in r.hgetall(key).items() for b in kv]  # type: ignore[union-attr]
    if kind == b"list":
        return list(r.lrange(key, 0, -1))  # type: ignore[arg-type]
    if kind == b"set":
        return list(r.smembers(key))  # type: ignore[arg-type]
    if kind == b"zset":
        return [m for m, _ in r.zrange(key, 0, -1, withscores=True)]  # type: ignore[union-attr]
    if kind == b"stream":
        return [b for _, fields in r.xrange(key) for kv in fields.items() for b in kv]  # type: ignore[union-attr]
    return [] if kind == b"none" else [r.dump(key) or b""]


def test_canary_token_never_leaves_the_environment(keyed: Keyed, redis_url: str) -> None:
    canary = keyed.canary
    assert canary.startswith("hf_canary")
    for name in ("api", "train", "generate"):  # the processes really hold it, or the test proves nothing
        environ = Path(f"/proc/{keyed.procs[name].pid}/environ").read_bytes()
        assert f"HF_TOKEN={canary}".encode() in environ.split(b"\0"), name
    seen: list[httpx.Response] = []
    with keyed.client("beta") as c, keyed.client("root") as admin:
        def keep(resp: httpx.Response) -> httpx.Response:
            seen.append(resp)
            return resp

        up = keep(c.post("/datasets", files={"file": ("s.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))}))
        jobs = [keep(admin.post("/jobs", json=body)).json()["id"] for body in (
            {"base_model": "tiny-gemma", "dataset": {"id": up.json()["id"]}, "hyperparameters": HP,
             "sample_prompts": ["Words"]},
            {"base_model": "tiny-gemma", "dataset": {"hub": {"name": "someone/gated-quotes"}},
             "template": "{quote}", "hyperparameters": HP},
        )]
        # the hub model job: the worker loads it with the token (offline here, so it fails)
        jobs.append(keep(admin.post("/jobs", json={"base_model": "google/gemma-2b", "dataset": {"rows": ROWS},
                                                   "hyperparameters": HP})).json()["id"])
        keep(c.post("/generate", json={"prompt": "Words", "max_new_tokens": 2, "base_model": "tiny-gemma"}))
        keep(c.post("/generate", json={"prompt": "Words", "max_new_tokens": 2, "base_model": "google/gemma-2b"}))
        keep(c.post("/v1/completions", json={"model": "tiny-gemma", "prompt": "Words", "max_tokens": 2}))
        deadline = time.monotonic() + 900
        while True:
            records = [keep(admin.get(f"/jobs/{j}")).json() for j in jobs]
            if all(r["status"] in TERMINAL for r in records):
                break
            assert time.monotonic() < deadline, records
            time.sleep(1)
        assert [r["status"] for r in records] == ["succeeded", "failed", "failed"], records
        assert records[1]["error"]["code"] == "dataset_unavailable"
        for j in jobs:
            for path in (f"/jobs/{j}", f"/jobs/{j}/events", f"/jobs/{j}/metrics", f"/v1/fine_tuning/jobs/{j}",
                         f"/v1/fine_tuning/jobs/{j}/events"):
                keep(admin.get(path))
            keep(admin.get(f"/jobs/{j}/events", headers={"Accept": "text/event-stream"}))
        for path in ("/jobs", "/datasets", "/v1/models", "/v1/files", "/metrics", "/readyz", "/openapi.json",
                     "/docs"):
            keep(admin.get(path))
        keep(c.post("/jobs", json={"dataset": {"rows": ROWS}, "base_model": "nope/nope"}))  # errors too
    assert len(seen) > 40
    for resp in seen:
        assert canary not in resp.text and canary not in str(resp.headers), resp.request.url

    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(f"{keyed.prefix}:*".encode(), count=1000))
    assert any(b":job:" in k for k in keys) and any(b":celery:" in k for k in keys)
    for key in keys:
        assert not any(canary.encode() in v for v in _values(r, key)), key

    logs = keyed.log_text()
    assert "ftaas.train" in logs or "Task ftaas.train" in logs  # the workers' logs are there
    assert canary not in logs


def test_token_file_is_read_and_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_TOKEN", "FTAAS_HF_TOKEN", "FTAAS_HF_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    secret = tmp_path / "hf_token"
    secret.write_text("hf_fromfile123\n")
    monkeypatch.setenv("FTAAS_HF_TOKEN_FILE", str(secret))
    s = Settings()
    assert s.hf_token is not None and s.hf_token.get_secret_value() == "hf_fromfile123"
    shown: list[Any] = [repr(s), str(s), s.model_dump_json(), str(s.model_dump())]
    assert not any("hf_fromfile123" in x for x in shown)
    monkeypatch.setenv("HF_TOKEN", "hf_fromenv456")  # the environment wins over the file
    assert Settings().hf_token.get_secret_value() == "hf_fromenv456"  # type: ignore[union-attr]
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("FTAAS_HF_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read FTAAS_HF_TOKEN_FILE"):
        Settings()
