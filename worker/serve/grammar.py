"""Constrained decoding for worker.serve.engine's rows with llguidance (chosen over xgrammar by
bench/grammar_overhead.py: 0.10 vs 1.04 ms per row per token with Gemma's 262k vocabulary on the CPU, both
correct; figures in bench/RESULTS.md).

A request's ``response_format`` (``{"type": "json_object"}`` or ``{"type": "json_schema", "schema": {...}}``)
is compiled once per schema (an LRU of compiled matchers, per tokenizer) on the submitting thread, never on the
engine thread; each row gets a copy of the compiled matcher. Per step, a constrained row's allowed tokens are its
matcher's bitmask (the model's end tokens added once the JSON is complete), applied as -inf to the others.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch as lt
import torch
from transformers import PreTrainedTokenizerBase

from app.core.errors import UserFacingError

log = logging.getLogger("ftaas.grammar")

#: Compiled grammars kept per tokenizer.
CACHE_SIZE = 64


def grammar_of(response_format: dict[str, Any]) -> str | None:
    """llguidance's grammar for a ``response_format``; None for ``text`` (no constraint)."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        schema = response_format.get("schema")
        if not isinstance(schema, dict):
            raise UserFacingError("invalid_request", "response_format.schema: a JSON schema object is required")
    else:
        raise UserFacingError("invalid_request", f"response_format.type: {kind!r} is not text, json_object "
                              "or json_schema")
    return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False}))


def schema_error(response_format: dict[str, Any]) -> str | None:
    """Why a ``response_format`` does not compile (no tokenizer needed: the API checks with it), or None."""
    try:
        grammar = grammar_of(response_format)
    except UserFacingError as e:
        return e.message
    except Exception as e:  # llguidance's own words
        return str(e)
    if grammar is None:
        return None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    return str(error) if error else None


class Grammars:
    """Compiled matchers of one tokenizer, an LRU keyed by the grammar; thread safe."""

    def __init__(self, tok: PreTrainedTokenizerBase, vocab: int) -> None:
        self.vocab = vocab
        self._tok = tok
        self._lltok: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (the cache's misses)

    def _tokenizer(self) -> Any:
        if self._lltok is None:
            self._lltok = llguidance.hf.from_tokenizer(self._tok, n_vocab=self.vocab)  # type: ignore[arg-type]
        return self._lltok

    def matcher(self, response_format: dict[str, Any] | None) -> Any:
        """A fresh matcher for the format (None: unconstrained); UserFacingError for a schema that does not
        compile."""
        if not response_format:
            return None
        try:
            grammar = grammar_of(response_format)
        except UserFacingError:
            raise
        except Exception as e:
            raise UserFacingError("invalid_request", f"response_format: {e}") from None
        if grammar is None:
            return None
        key = grammar
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is None:
                compiled = llguidance.LLMatcher(self._tokenizer(), grammar)
                if compiled.is_error():
                    raise UserFacingError("invalid_request", f"response_format: {compiled.get_error()}")
                self.compiled += 1
                self._cache[key] = compiled
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            return compiled.deep_copy()


def allowed(matcher: Any, vocab: int, ends: list[int]) -> torch.Tensor:
    """int32 ``[1, ceil(vocab / 32)]`` on the CPU: the bitmask of the tokens the matcher allows next, with the end
    tokens ``ends`` once it accepts (the grammar knows only the tokenizer's eos; the chat template's end of turn
    ends a row too)."""
    bits = lt.allocate_token_bitmask(1, vocab)
    lt.fill_next_token_bitmask(matcher, bits, 0)
    if matcher.is_accepting():
        for e in ends:
            bit = e % 32
            bits[0, e // 32] |= (1 << bit) if bit < 31 else -(1 << 31)
    return bits


_FUSED = [True]  # llguidance's kernel is torch.compile'd: where that cannot build, the plain torch ops below


def apply_mask(logits: torch.Tensor, bits: torch.Tensor) -> None:
    """-inf in place to every token of ``logits [vocab]`` that ``bits`` (from ``allowed``) does not allow
    (llguidance's fused kernel; the same ops unfused where torch.compile is unavailable)."""
    bits = bits.to(logits.device, non_blocking=True)
    if _FUSED[0]:
        try:
            lt.apply_token_bitmask_inplace(logits, bits)
            return
        except Exception:
            log.exception("llguidance's fused mask kernel failed; applying masks unfused")
            _FUSED[0] = False
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    ok = ((bits[0][:, None] >> shifts) & 1).flatten()[:logits.shape[-1]].bool()
    logits.masked_fill_(~ok, float("-inf"))
