"""Logprobs of worker.serve.engine's rows: each chosen token's log-probability and its top-k alternatives,
from the very logits that picked it (log_softmax of the model's logits before temperature, top-k and top-p, as
vLLM and OpenAI report them), and with ``echo`` every prompt token's, from the prefill's logits at every
position. Computed on the device for the rows that asked, batched per step (one log_softmax, one topk); under
CUDA graphs on the graph's output logits after its replay.

A row's output ``logprobs`` (lists of one entry per token, prompt tokens first with ``echo``)::

    {"tokens": [str], "token_ids": [int], "token_logprobs": [float | None],
     "top_logprobs": [dict[str, float] | None], "text_offset": [int]}

Special tokens the tokenizer adds before the prompt (<bos>) are not echoed: the first echoed token is then
scored given <bos>. Without such a token the first prompt token has no logprob (nothing predicts it): None in
``token_logprobs`` and ``top_logprobs``.
A token's string is ``tokenizer.decode([id])`` (special tokens as their text); ``top_logprobs`` maps the k
likeliest tokens' strings to their logprobs ({} when k is 0; two ids of one string keep the likelier);
``text_offset`` is each token's character offset in (the prompt with echo, else "") + the generated text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from worker.decoding import decode_new

#: The most alternatives a row may ask for (OpenAI's bound).
TOP_MAX = 20
#: Prompt positions per lm_head call with echo: ``[chunk, vocab]`` fp32 logits at a time (Gemma's 262k vocab:
#: 134 MB), not the whole prompt's at once.
PROMPT_CHUNK = 128

#: One token: its id, its logprob (None for the first prompt token) and the top-k as (id, logprob), best first.
Entry = tuple[int, float | None, list[tuple[int, float]] | None]


@dataclass
class RowLogprobs:
    """What one row collects: ``k`` alternatives per token, the prompt's entries (echo) and the generated ones."""

    k: int
    prompt: list[Entry] = field(default_factory=list)
    generated: list[Entry] = field(default_factory=list)


def chosen(logits: torch.Tensor, at: list[int], tokens: list[int], ks: list[int]) -> list[Entry]:
    """Entries for ``tokens[i]`` picked from ``logits[at[i]]`` (``logits [rows, vocab]``), with ``ks[i]``
    alternatives each."""
    if not at:
        return []
    lp = torch.log_softmax(logits[torch.tensor(at, device=logits.device)].float(), -1)  # [m, vocab]
    picked = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()  # [m]
    k = max(ks)
    top_v: list[list[float]] = [[] for _ in at]
    top_i: list[list[int]] = [[] for _ in at]
    if k:
        top = lp.topk(min(k, lp.shape[-1]), -1)  # [m, k]
        top_v, top_i = top.values.tolist(), top.indices.tolist()
    return [(t, float(p), list(zip(i[:kk], v[:kk], strict=True)))
            for t, p, i, v, kk in zip(tokens, picked, top_i, top_v, ks, strict=True)]


def record(rows: list[tuple[RowLogprobs, int, int]], logits: torch.Tensor) -> None:
    """Append each ``(row's logprobs, its logits row, its chosen token)`` entry, batched over the rows."""
    entries = chosen(logits, [a for _, a, _ in rows], [t for _, _, t in rows], [lp.k for lp, _, _ in rows])
    for (lp, _, _), entry in zip(rows, entries, strict=True):
        lp.generated.append(entry)


def added_in_front(tok: PreTrainedTokenizerBase) -> int:
    """How many special tokens the tokenizer puts before a prompt's own (Gemma's <bos>: 1). They are not the
    text the client sent, so not echoed: evaluation harnesses slice the echoed lists by the context's token count
    without them (lm-evaluation-harness: ``token_logprobs[ctxlen:-1]``); echoing <bos> shifted that by one."""
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    return max(len(with_special) - len(tok("a", add_special_tokens=False)["input_ids"]), 0)


def prompt_entries(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, ids: list[int],
                   k: int, skip: int = 0) -> list[Entry]:
    """The prompt's entries from the prefill's ``hidden [len(ids), hidden]`` of one row, from token ``skip`` on
    (the tokenizer's own leading tokens left out): position p's logits score token p + 1 (``logits_of`` is the
    engine's lm_head and softcap), chunk by chunk."""
    out: list[Entry] = [] if skip else [(ids[0], None, None)]
    for s in range(max(skip - 1, 0), len(ids) - 1, PROMPT_CHUNK):
        e = min(s + PROMPT_CHUNK, len(ids) - 1)
        out += chosen(logits_of(hidden[s:e]), list(range(e - s)), ids[s + 1:e + 1], [k] * (e - s))
    return out


def _offsets(tok: PreTrainedTokenizerBase, ids: list[int], base: int) -> list[int]:
    """Each token's character offset in ``base`` characters + the decode of ``ids`` (cumulative, incremental:
    the tokens of a character split over several get the offset where it starts)."""
    offsets: list[int] = []
    length, prefix, read = 0, 0, 0
    for n in range(len(ids)):
        offsets.append(base + length)
        new, prefix, read = decode_new(tok, ids[:n + 1], prefix, read)
        length += len(new)
    return offsets


def as_output(lp: RowLogprobs, tok: PreTrainedTokenizerBase, prompt: str | None) -> dict[str, Any]:
    """The row's ``logprobs`` output (the module docstring); ``prompt``: its text when it echoes."""
    entries = [*lp.prompt, *lp.generated]
    wanted = sorted({t for t, _, _ in entries} | {i for _, _, top in entries for i, _ in top or []})
    text = dict(zip(wanted, tok.batch_decode([[i] for i in wanted], skip_special_tokens=False), strict=True))
    tops: list[dict[str, float] | None] = []
    for _, _, top in entries:
        tops.append(None if top is None else {})
        for i, v in top or []:
            tops[-1].setdefault(text[i], v)  # type: ignore[union-attr]
    prompt_ids, gen_ids = [t for t, _, _ in lp.prompt], [t for t, _, _ in lp.generated]
    offsets = _offsets(tok, prompt_ids, 0) + _offsets(tok, gen_ids, len(prompt or ""))
    return {"tokens": [text[t] for t, _, _ in entries], "token_ids": [t for t, _, _ in entries],
            "token_logprobs": [p for _, p, _ in entries], "top_logprobs": tops, "text_offset": offsets}
