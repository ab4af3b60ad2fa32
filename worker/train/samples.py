"""Before/after samples of a training job: HF ``generate`` on the model being trained, one batch at a time.

Serving has its own engine (worker/serve); both end a continuation the same way (worker/decoding.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, set_seed

from worker.decoding import LENGTH, STOP, FinishReason, finished_output


def generate_texts(model: Any, tok: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                   seed: int | None = None, stop: list[str] | None = None) -> list[dict[str, Any]]:
    """Continuations of left-padded ``prompts``: text (prompt excluded), token count, finish reason."""
    # decoder-only batches pad on the left (per call: the tokenizer is shared, worker/models.py)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                              "pad_token_id": tok.pad_token_id}
    if do_sample:
        kwargs |= {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    else:
        kwargs |= {"temperature": None, "top_p": None, "top_k": None}
    if stop:
        kwargs |= {"stop_strings": stop, "tokenizer": tok}
    if seed is not None:
        set_seed(seed)
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    return [_continuation(tok, row, stop or []) for row in out[:, enc["input_ids"].shape[1]:]]


def _continuation(tok: PreTrainedTokenizerBase, row: torch.Tensor, stop: list[str]) -> dict[str, Any]:
    """One generated row (prompt excluded) as an output: ids up to the first end/pad token, decoded, cut at a
    stop string."""
    ids = row.tolist()
    finish: FinishReason = LENGTH
    eos = {tok.eos_token_id, tok.pad_token_id} - {None}
    for i, t in enumerate(ids):
        if t in eos:
            ids, finish = ids[:i], STOP
            break
    return finished_output(str(tok.decode(ids, skip_special_tokens=True)), len(ids), finish, stop)
