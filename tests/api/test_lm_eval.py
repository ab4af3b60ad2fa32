"""lm-evaluation-harness ``local-completions`` against the running service (issue 20): a multiple-choice task
(loglikelihood requests: ``echo``, ``logprobs: 1``, ``max_tokens: 1``) and a generation task over the JSONL in
tests/fixtures/lm_eval, for a base model and an adapter. The loglikelihoods lm_eval received are checked against
the model run directly in the test (loaded as the worker loads it, the adapter through peft): they are the
continuations' true loglikelihoods.

Offline: the tasks are local files, and lm_eval's tokenizer is the built-in model's folder (lm_eval needs one to
split context from continuation; ``tokenized_requests=False`` sends text, as ftaas refuses token-id prompts)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager
from peft import PeftModel

from app.core import paths
from app.core.settings import Settings
from tests.conftest import ROOT, tiny_job, wait_for
from worker.models import builtin_path, load_model, load_tokenizer

FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ["ftaas_quotes_mc", "ftaas_quotes_gen"]
#: Per item, in nats: NF4 weights with fp32 compute on the CPU on both sides, but the engine batches and pads.
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def adapter(client: httpx.Client, quotes: list[dict[str, Any]]) -> str:
    """A tiny-gemma adapter pushed hard enough (the highest learning rate, LoRA scaling 8) that its scores differ
    from the base's: the random tiny model's gradients are small (at 6 steps of 5e-3, scaling 1, 0.03 nats)."""
    job = tiny_job(quotes[:16], max_steps=8, learning_rate=1e-2, warmup_steps=0, lora={"r": 8, "alpha": 64})
    resp = client.post("/jobs", json=job | {"name": "lmeval"})
    assert resp.status_code == 202, resp.text
    done = wait_for(client, resp.json()["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    return str(done["id"])


def _evaluate(service: str, model: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(ROOT)  # the task files name their JSONL relative to the repository root
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{service}/v1/completions", "model": model, "tokenizer_backend": "huggingface",
                    "tokenizer": str(builtin_path("tiny-gemma", settings)), "tokenized_requests": False,
                    "num_concurrent": 1, "max_retries": 1, "timeout": 300},
        tasks=list(TASKS), task_manager=TaskManager(include_path=str(FIXTURES)), batch_size=1,
        log_samples=True, bootstrap_iters=0)
    assert results is not None
    return dict(results)


def _direct(model: Any, pairs: list[tuple[str, str]]) -> list[tuple[float, float]]:
    """For each (context, continuation), from the model run directly on the prompt lm_eval sends (context +
    continuation as one text, tokenized as the engine does, <bos> first), the log_softmax of each token given
    everything before it: (the continuation's tokens summed: its true loglikelihood, the context's last token's)."""
    tok = load_tokenizer("tiny-gemma", Settings(device="cpu"))
    out = []
    with torch.no_grad():
        for context, continuation in pairs:
            ids = tok(context + continuation, add_special_tokens=True)["input_ids"]
            n_ctx = len(tok(context, add_special_tokens=True)["input_ids"])
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            scores = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]  # scores[i - 1]: token i's
            out.append((sum(scores[n_ctx - 1:]), scores[n_ctx - 2]))
    return out


def _mc(results: dict[str, Any]) -> tuple[list[tuple[str, str]], list[float]]:
    """Each multiple-choice request's (context, continuation) and the loglikelihood lm_eval took from the answer."""
    pairs, lls = [], []
    for sample in results["samples"]["ftaas_quotes_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            pairs.append((context, continuation))
            lls.append(float(resp[0][0]))
    return pairs, lls


def test_lm_eval_base_and_adapter(service: str, client: httpx.Client, adapter: str, data_dir: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(device="cpu", data_dir=data_dir)
    started = time.monotonic()
    base = _evaluate(service, "tiny-gemma", settings, monkeypatch)
    tuned = _evaluate(service, adapter, settings, monkeypatch)
    print(f"lm_eval, two runs of both tasks: {time.monotonic() - started:.1f} s")

    for results in (base, tuned):
        assert results["results"]["ftaas_quotes_mc"]["acc,none"] is not None
        assert results["results"]["ftaas_quotes_gen"]["exact_match,strip"] is not None
        assert len(results["samples"]["ftaas_quotes_mc"]) == 8 and len(results["samples"]["ftaas_quotes_gen"]) == 8

    model = load_model("tiny-gemma", "nf4", settings)
    model.eval()
    base_pairs, base_lls = _mc(base)
    assert len(base_pairs) == 32
    base_direct = _direct(model, base_pairs)
    peft = PeftModel.from_pretrained(model, str(paths.adapter_dir(settings, adapter)))
    peft.eval()
    tuned_pairs, tuned_lls = _mc(tuned)
    assert tuned_pairs == base_pairs
    tuned_direct = _direct(peft, tuned_pairs)

    # What lm_eval takes from the answer: token_logprobs[ctxlen:-1], ctxlen counted by its own tokenizer without
    # <bos>. The engine puts <bos> before a text prompt (as vLLM does) but does not echo it, so that slice is the
    # continuation's tokens: lm_eval's number is the true loglikelihood computed directly, base and adapter.
    # (Echoing <bos> made it the continuation's plus the context's last token's: 12.5 nats off per item.)
    seen = base_lls + tuned_lls
    expected = [cont for cont, _ in base_direct + tuned_direct]
    diffs = [abs(a - b) for a, b in zip(seen, expected, strict=True)]
    print(f"max |lm_eval - direct| loglikelihood: {max(diffs):.4f} nats over {len(diffs)} requests")
    assert seen == pytest.approx(expected, abs=TOLERANCE)
    # so accuracy is the true loglikelihoods' argmax
    for results, direct in ((base, base_direct), (tuned, tuned_direct)):
        hits = 0
        for i, sample in enumerate(results["samples"]["ftaas_quotes_mc"]):
            true = [cont for cont, _ in direct[4 * i:4 * i + 4]]
            hits += true.index(max(true)) == sample["doc"]["answer"]
        assert results["results"]["ftaas_quotes_mc"]["acc,none"] == pytest.approx(hits / 8)
    # the adapter's rows were scored with the adapter: its loglikelihoods are not the base's
    shift = max(abs(a[0] - b[0]) for a, b in zip(base_direct, tuned_direct, strict=True))
    print(f"largest adapter - base loglikelihood difference: {shift:.3f} nats")
    assert shift > 4 * TOLERANCE

    # generate_until: what lm_eval received is the service's own greedy completion of the same request
    for results, model_name in ((base, "tiny-gemma"), (tuned, adapter)):
        for sample in results["samples"]["ftaas_quotes_gen"][:2]:
            context, kwargs = sample["arguments"][0]
            assert kwargs["until"][0] == "\n"
            own = client.post("/v1/completions", json={"model": model_name, "prompt": context, "max_tokens": 8,
                                                       "temperature": 0, "stop": kwargs["until"]})
            assert own.status_code == 200, own.text
            assert sample["resps"][0][0] == own.json()["choices"][0]["text"]
