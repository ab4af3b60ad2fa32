"""Generated ids to text, for serving (worker/serve/engine.py) and training's samples (worker/train/samples.py):
a finished continuation is its text cut at the first stop string, its token count and why it ended."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

FinishReason = Literal["stop", "length"]
STOP: FinishReason = "stop"  # an end-of-sequence token or a stop string
LENGTH: FinishReason = "length"  # max_new_tokens (or the row's length) reached


def has_stop(text: str, stop: Sequence[str]) -> bool:
    """Whether any stop string occurs in ``text``."""
    return any(s in text for s in stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` before the earliest stop string in it (the stop string itself excluded), and whether one was."""
    cuts = [text.index(s) for s in stop if s in text]
    if not cuts:
        return text, False
    return text[: min(cuts)], True


def finished_output(text: str, tokens: int, finish: FinishReason, stop: Sequence[str]) -> dict[str, Any]:
    """One output as the API returns it: ``text`` cut at a stop string (``finish`` becomes ``stop`` then),
    ``tokens`` generated and the finish reason."""
    text, cut = cut_at_stop(text, stop)
    return {"text": text, "tokens": tokens, "finish_reason": STOP if cut else finish}


def decode_new(tok: PreTrainedTokenizerBase, ids: list[int], prefix: int, read: int) -> tuple[str, int, int]:
    """The text that ``ids[read:]`` add after ``ids[:read]``, decoding only the last few tokens (a whole decode
    per token per row costs O(length) each step); the window ``ids[prefix:]`` keeps one token before the new ones
    so a tokenizer's word-start handling sees the same context (as vLLM's incremental detokenizer).

    Returns that text and the next ``(prefix, read)``; ``("", prefix, read)`` while the new tokens end in a
    partial character."""
    before = str(tok.decode(ids[prefix:read], skip_special_tokens=True))
    after = str(tok.decode(ids[prefix:], skip_special_tokens=True))
    if len(after) > len(before) and not after.endswith("\ufffd"):
        return after[len(before):], read, len(ids)
    return "", prefix, read
