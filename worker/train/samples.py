"""Before/after samples of a training job: HF ``generate`` on the model being trained, one batch at a time.

Serving has its own engine (worker/serve); both end a continuation the same way (worker/decoding.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, set_seed

from worker.decoding import LENGTH, STOP, FinishReason, end_token_ids, finished_output


def generate_texts(model: Any, tok: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                   seed: int | None = None, stop: list[str] | None = None,
                   bf16_head: bool = False) -> list[dict[str, Any]]:
    """Continuations of left-padded ``prompts``: text (prompt excluded), token count, finish reason.
    ``bf16_head``: on the CPU, the LM head in bf16 (``_bf16_head_on_cpu``; training's samples take it)."""
    # decoder-only batches pad on the left (per call: the tokenizer is shared, worker/models.py)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    ends = end_token_ids(tok, model)  # the model's every end token (Gemma's <end_of_turn> too): a chat turn ends
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                              "pad_token_id": tok.pad_token_id, "eos_token_id": sorted(ends)}
    if do_sample:
        kwargs |= {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    else:
        kwargs |= {"temperature": None, "top_p": None, "top_k": None}
    if stop:
        kwargs |= {"stop_strings": stop, "tokenizer": tok}
    if seed is not None:
        set_seed(seed)
    with torch.inference_mode(), _bf16_head_on_cpu(model) if bf16_head else nullcontext():
        out = model.generate(**enc, **kwargs)
    return [_continuation(tok, row, stop or [], ends) for row in out[:, enc["input_ids"].shape[1]:]]


@contextmanager
def _bf16_head_on_cpu(model: Any) -> Iterator[None]:
    """While decoding on the CPU, the LM head's matmul in bf16 (a bf16 copy of its weight, dropped after).

    The head is the one big unquantized matrix (Gemma 3's 262k x 640, tied to the embedding) and each decoded
    token reads all of it; in fp32 that was 65 % of a 270M sample step here, and the bf16 product (AVX512-BF16)
    is 4x faster (3 x 640 by 640 x 262144: 181 ms fp32, 43 ms bf16 on this 2-core EPYC). A greedy continuation
    can differ from the fp32 head's where two tokens nearly tie (1 of the walk-through's 3 samples, after 20
    tokens), as it would on a GPU, whose weights are bf16 already; serving keeps the fp32 head on the CPU (its
    logprobs are exact, and tests/serve compares it with this function without the option). Training is
    untouched: its head stays fp32."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (not isinstance(head, torch.nn.Linear) or head.weight.device.type != "cpu"
            or head.weight.dtype != torch.float32 or head.bias is not None):
        yield
        return
    weight = head.weight.detach().to(torch.bfloat16)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), weight).to(x.dtype)

    head.forward = forward  # an instance attribute: shadows the class's forward until deleted
    try:
        yield
    finally:
        del head.forward


def _continuation(tok: PreTrainedTokenizerBase, row: torch.Tensor, stop: list[str],
                  ends: frozenset[int]) -> dict[str, Any]:
    """One generated row (prompt excluded) as an output: ids up to the first end/pad token, decoded, cut at a
    stop string."""
    ids = row.tolist()
    finish: FinishReason = LENGTH
    eos = (set(ends) | {tok.pad_token_id}) - {None}
    for i, t in enumerate(ids):
        if t in eos:
            ids, finish = ids[:i], STOP
            break
    return finished_output(str(tok.decode(ids, skip_special_tokens=True)), len(ids), finish, stop)
