"""A request's sampling settings, how one row's next token is sampled, and what of its text may stream yet."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from worker.serve.grammar import apply_mask


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
    presence_penalty: float = 0.0  # OpenAI's: minus this from every token the row has generated
    frequency_penalty: float = 0.0  # minus this times how often the row has generated the token
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (JSON: str keys)
    response_format: dict[str, Any] | None = None  # worker.serve.grammar: json_object / json_schema

    def __post_init__(self) -> None:
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    @property
    def adjusts(self) -> bool:
        """Whether the row's logits change before sampling (bias or penalty; a grammar is the row's own)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty)


def adjust(logits: torch.Tensor, p: Params, counts: dict[int, int], allowed: torch.Tensor | None) -> torch.Tensor:
    """One row's ``logits [vocab]`` as sampling sees them: + logit_bias, - penalties over the row's generated
    ``counts`` (OpenAI's formula: count * frequency_penalty + (count > 0) * presence_penalty), then the grammar's
    ``allowed`` bitmask (worker.serve.grammar.allowed). A new tensor: logprobs keep the raw logits."""
    x = logits.clone()
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=x.device)
        x[ids] += torch.tensor(list(p.logit_bias.values()), device=x.device, dtype=x.dtype)
    if counts and (p.presence_penalty or p.frequency_penalty):
        ids = torch.tensor(list(counts), device=x.device)
        c = torch.tensor(list(counts.values()), device=x.device, dtype=x.dtype)
        x[ids] -= c * p.frequency_penalty + p.presence_penalty
    if allowed is not None:
        apply_mask(x, allowed)
    return x


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
