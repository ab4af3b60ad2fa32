"""The engine's per-request options on tiny-gemma in fp32 (no Celery): ``n`` completions per prompt, token
logprobs checked against a direct full forward of the model (base and adapter rows), ``echo`` scoring the prompt,
and the end tokens (the chat template's end of turn ends a row with ``stop``)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from app.core import paths
from app.core.settings import Settings
from tests.serve.test_engine import PROMPTS, make_adapter, names, req
from worker.decoding import end_token_ids
from worker.models import builtin_path, load_model, load_tokenizer
from worker.serve.engine import BatchEngine
from worker.serve.logprobs import PROMPT_CHUNK
from worker.serve.pool import EnginePool
from worker.serve.sampling import Params

END_OF_TURN = 106  # <end_of_turn> in the Gemma 3 vocabulary


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str, EnginePool, PreTrainedTokenizerBase]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("options"), device="cpu")
    (adapter,) = names(1, 70)
    make_adapter(settings.adapter_dir / adapter, AutoConfig.from_pretrained(str(builtin_path("tiny-gemma", settings))),
                 seed=4, scale=0.5)
    return settings, adapter, EnginePool(settings), load_tokenizer("tiny-gemma", settings)


def fp32(prompt: str | list[str], adapter: str | None = None, **kw: Any) -> dict[str, Any]:
    return req(prompt, adapter, quantization="none", **kw)


def reference(settings: Settings, adapter: str | None) -> nn.Module:
    """The model as transformers (and peft, for an adapter) runs it: the numbers to match."""
    model: nn.Module = load_model("tiny-gemma", "none", settings)
    if adapter:
        model = PeftModel.from_pretrained(model, str(settings.adapter_dir / adapter))
    return model.eval()


def direct_logprobs(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """log_softmax of one full forward over ``ids``: row p scores token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_n_completions_are_prompt_major_seeded_and_reproducible(setup: Any) -> None:
    _, adapter, pool, _ = setup
    body = fp32(PROMPTS[:2], adapter, n=3, do_sample=True, seed=7, max_new_tokens=8)
    pieces: list[tuple[int, str]] = []
    first = pool.generate(body, on_piece=lambda i, t: pieces.append((i, t)))["outputs"]
    assert len(first) == 6 and pool.generate(body)["outputs"] == first, "seeded: the same six again"
    for i in range(2):
        texts = [o["text"] for o in first[i * 3:(i + 1) * 3]]
        assert len(set(texts)) == 3, texts
        for j in range(3):  # completion j of prompt i is what n=1 with seed + j gives for prompt i
            alone = pool.generate(fp32(PROMPTS[i], adapter, do_sample=True, seed=7 + j, max_new_tokens=8))
            assert alone["outputs"] == [first[i * 3 + j]]
    for k, out in enumerate(first):
        assert "".join(t for i, t in pieces if i == k) == out["text"], "streamed pieces carry the output index"
    plain = pool.generate(fp32(PROMPTS[:2]))["outputs"]
    assert len(plain) == 2 and all("logprobs" not in o for o in plain)
    tok = setup[3]
    assert [o["prompt_tokens"] for o in plain] == [len(tok(p)["input_ids"]) for p in PROMPTS[:2]]


@pytest.mark.parametrize("adapter_row", [False, True])
def test_logprobs_equal_a_direct_forward(setup: Any, adapter_row: bool) -> None:
    settings, adapter, pool, tok = setup
    name = adapter if adapter_row else None
    greedy = fp32(PROMPTS[:2], name, logprobs=5, max_new_tokens=6)
    sampled = fp32(PROMPTS[2], name, logprobs=0, max_new_tokens=6, do_sample=True, seed=3, temperature=0.5, top_k=5)
    futures = [pool.submit(greedy), pool.submit(sampled), pool.submit(fp32(PROMPTS[0], None if name else adapter))]
    outputs = futures[0].result()["outputs"] + futures[1].result()["outputs"]  # shared steps with another row
    model = reference(settings, name)
    for out, prompt, k in zip(outputs, [*PROMPTS[:2], PROMPTS[2]], [5, 5, 0], strict=True):
        lp = out["logprobs"]
        ids = tok(prompt)["input_ids"]
        gen = lp["token_ids"]
        assert out["prompt_tokens"] == len(ids) and len(gen) == out["tokens"] == 6
        assert tok.decode(gen, skip_special_tokens=True) == out["text"]
        ref = direct_logprobs(model, ids + gen)
        want = [ref[len(ids) - 1 + t, g].item() for t, g in enumerate(gen)]
        assert lp["token_logprobs"] == pytest.approx(want, abs=1e-3), "log_softmax of the raw logits"
        assert lp["tokens"] == [tok.decode([g]) for g in gen]
        for t, (g, top) in enumerate(zip(gen, lp["top_logprobs"], strict=True)):
            assert len(top) <= k and (k == 0) == (not top)
            if k:
                best = ref[len(ids) - 1 + t].topk(k)
                assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-3)
                assert top[tok.decode([g])] == pytest.approx(lp["token_logprobs"][t], abs=1e-6), "greedy: the argmax"
        offsets = lp["text_offset"]
        assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(out["text"])
        for off, piece, g in zip(offsets, lp["tokens"], gen, strict=True):
            if g not in tok.all_special_ids and "\ufffd" not in piece:
                assert out["text"][off:].startswith(piece)


def test_echo_scores_the_prompt(setup: Any) -> None:
    settings, adapter, pool, tok = setup
    long = "Quote: " + " ".join(["the sun also rises over quiet hills"] * 30)
    assert len(tok(long)["input_ids"]) > PROMPT_CHUNK + 10, "the prompt spans two logit chunks"
    for name in (None, adapter):
        model = reference(settings, name)
        score = pool.generate(fp32([PROMPTS[0], long], name, echo=True, logprobs=2, max_new_tokens=0))["outputs"]
        for prompt, out in zip([PROMPTS[0], long], score, strict=True):
            ids = tok(prompt)["input_ids"]
            assert ids[0] == tok.bos_token_id
            lp = out["logprobs"]
            assert (out["text"], out["tokens"], out["finish_reason"]) == ("", 0, "length")
            # <bos> is the tokenizer's, not the client's text: not echoed, so each echoed token has a score
            assert out["prompt_tokens"] == len(ids) and lp["token_ids"] == ids[1:]
            ref = direct_logprobs(model, ids)
            want = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
            assert lp["token_logprobs"] == pytest.approx(want, abs=1e-3)
            assert all(top is not None and len(top) == 2 for top in lp["top_logprobs"])
            for off, piece in zip(lp["text_offset"], lp["tokens"], strict=True):
                assert prompt[off:].startswith(piece)
        both = pool.generate(fp32(PROMPTS[1], name, echo=True, logprobs=1, max_new_tokens=4))["outputs"][0]
        ids = tok(PROMPTS[1])["input_ids"]
        lp = both["logprobs"]
        assert len(lp["token_ids"]) == len(ids) - 1 + both["tokens"] and lp["token_ids"][:len(ids) - 1] == ids[1:]
        assert lp["text_offset"][len(ids) - 1] == len(PROMPTS[1]), "generated offsets follow the prompt's text"
        assert both["text"] == pool.generate(fp32(PROMPTS[1], name, max_new_tokens=4))["outputs"][0]["text"]
        full = [ids[0], *lp["token_ids"]]
        ref = direct_logprobs(model, full)
        want = [ref[p - 1, t].item() for p, t in enumerate(full) if p]
        assert lp["token_logprobs"] == pytest.approx(want, abs=1e-3)

def test_end_token_ids_of_gemma3_270m() -> None:
    settings = Settings(device="cpu")
    path = builtin_path("gemma-3-270m", settings)
    tok = load_tokenizer("gemma-3-270m", settings)
    model = SimpleNamespace(config=AutoConfig.from_pretrained(str(path)),
                            generation_config=GenerationConfig.from_pretrained(str(path)))
    ends = end_token_ids(tok, model)
    assert tok.convert_ids_to_tokens(END_OF_TURN) == "<end_of_turn>"
    assert {END_OF_TURN, tok.eos_token_id} <= ends and tok.unk_token_id not in ends
    assert tok.convert_tokens_to_ids("</s>") not in ends, "</s> is an ordinary token in Gemma's vocabulary"
    listed = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1, 50]), config=None)
    assert end_token_ids(tok, listed) == {1, 50, END_OF_TURN} and end_token_ids(tok) == {1, END_OF_TURN}


class _EndOfTurnAfter(nn.Module):
    """The lm_head, but from call ``at`` on the end-of-turn token wins (its logit far above the rest)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head, self.calls, self.at = head, 0, 10**9

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(hidden)
        self.calls += 1
        if self.calls >= self.at:
            out = out.clone()
            out[..., END_OF_TURN] += 1e4
        return out


def test_end_of_turn_ends_a_row_with_stop(setup: Any, tmp_path: Path) -> None:
    settings, *_ = setup
    tok = load_tokenizer("tiny-gemma", settings)
    model = load_model("tiny-gemma", "none", settings).eval()
    assert END_OF_TURN not in {tok.eos_token_id, model.generation_config.eos_token_id}, "the config lists <eos> only"
    head = _EndOfTurnAfter(model.lm_head)
    model.lm_head = head
    engine = BatchEngine(model, tok, max_rows=2, max_len=128, slots=1, rank=8,
                         adapter_path=partial(paths.adapter_dir, settings), cuda_graphs=False)
    try:
        params = Params(max_new_tokens=8, logprobs=0)
        free = engine.submit([PROMPTS[0]], params).result()["outputs"][0]
        assert free["finish_reason"] == "length" and free["tokens"] == 8
        head.at = head.calls + 3  # the prefill and one decode step pick as before, the next call ends the turn
        ended = engine.submit([PROMPTS[0]], params).result()["outputs"][0]
    finally:
        engine.close()
    assert ended["finish_reason"] == "stop" and ended["tokens"] == 2
    assert ended["logprobs"]["token_ids"] == free["logprobs"]["token_ids"][:2], "the end token is no output token"
    assert ended["text"] == tok.decode(free["logprobs"]["token_ids"][:2], skip_special_tokens=True)
    assert "<end_of_turn>" not in ended["text"]
