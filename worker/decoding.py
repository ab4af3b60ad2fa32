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


#: End-of-turn tokens of the chat templates we know: a chat model ends its turn with one of these, and a
#: converted checkpoint's config may list only ``<eos>`` (the built-in gemma-3-270m, from GGUF, does).
END_OF_TURN_TOKENS = ("<end_of_turn>",  # Gemma
                      "<|eot_id|>", "<|eom_id|>",  # Llama 3
                      "<|im_end|>",  # ChatML / Qwen
                      "<|end|>")  # Phi-3


def _ids(value: Any) -> list[int]:
    """An ``eos_token_id`` setting (None, an int or a list of ints) as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def end_token_ids(tokenizer: PreTrainedTokenizerBase, model: Any = None) -> frozenset[int]:
    """Every token id that ends a generation: the model's ``generation_config.eos_token_id`` and
    ``config.eos_token_id`` (an int or a list), the tokenizer's eos, and each family's end-of-turn token
    (END_OF_TURN_TOKENS, and ``</s>`` where it is the eos) that the tokenizer's vocabulary holds.

    ``model`` may be None or anything with ``config`` / ``generation_config`` attributes. Pure: nothing is
    loaded or changed (worker/serve/engine.py and worker/train/samples.py both call it)."""
    ids = [*_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None)),
           *_ids(getattr(getattr(model, "config", None), "eos_token_id", None)),
           *_ids(tokenizer.eos_token_id)]
    names = [*END_OF_TURN_TOKENS, *(["</s>"] if tokenizer.eos_token == "</s>" else [])]
    for name in names:
        tid = tokenizer.convert_tokens_to_ids(name)
        # an unknown token maps to unk (or None): keep only ids that are this very token
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(tid) == name:
            ids.append(tid)
    return frozenset(ids)
