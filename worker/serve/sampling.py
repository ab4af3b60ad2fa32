"""A request's sampling settings, how one row's next token is sampled, and what of its text may stream yet."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Params:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1  # rows (completions) per prompt; row j samples with seed + j
    logprobs: int | None = None  # None: none; k: each token's logprob and its k likeliest (worker.serve.logprobs)
    echo: bool = False  # also the prompt's tokens' logprobs (max_new_tokens may be 0 then)


def sample(logits: torch.Tensor, p: Params, gen: torch.Generator | None) -> int:
    """One token from one row's ``logits [vocab]``: temperature, then top-k, then top-p, drawn with ``gen``."""
    x = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(x, min(p.top_k, x.shape[-1])).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, -1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p (at least one)
        x = x.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(x, -1), 1, generator=gen).item())


def holdback(text: str, stop: list[str]) -> str:
    """What may be streamed now: not a trailing partial character, nor a tail that could begin a stop string."""
    text = text.rstrip("\ufffd")
    keep = len(text)
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]
