"""Per-token overhead of constrained decoding (JSON schema) with xgrammar and llguidance on this machine: for a
batch of rows, each step computes every row's token mask, applies it to ``[rows, vocab]`` fp32 logits, picks a
token (argmax of random logits under the mask: random valid JSON) and advances the row's matcher. The
Gemma 3 262k vocabulary (the built-in gemma-3-270m tokenizer). Compile times are reported apart (cached per
schema in worker/serve/grammar.py).

    .venv/bin/python bench/grammar_overhead.py --rows 1 8 --steps 200   # [--only xgrammar llguidance engine]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from app.core.settings import Settings
from worker.models import load_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


class Backend:
    name: str
    fill: Callable[[int], Any]  # row -> fill its mask
    apply: Callable[[torch.Tensor], Any]
    accept: Callable[[int, int], bool]  # (row, token) -> finished
    reset: Callable[[int], Any]


def xgrammar_backend(tok: Any, vocab: int, rows: int) -> tuple[Backend, float]:
    import xgrammar as xgr
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    t = time.perf_counter()
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    mask = xgr.allocate_token_bitmask(rows, vocab)
    b = Backend()
    b.name = f"xgrammar {getattr(xgr, '__version__', '')}".strip()
    b.fill = lambda i: matchers[i].fill_next_token_bitmask(mask, i)
    b.apply = lambda logits: xgr.apply_token_bitmask_inplace(logits, mask)

    def accept(i: int, token: int) -> bool:
        assert matchers[i].accept_token(token)
        return bool(matchers[i].is_terminated())
    b.accept = accept
    b.reset = lambda i: matchers[i].reset()
    return b, compile_s


def llguidance_backend(tok: Any, vocab: int, rows: int) -> tuple[Backend, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(rows)]
    compile_s = time.perf_counter() - t
    mask = lt.allocate_token_bitmask(rows, vocab)
    b = Backend()
    b.name = "llguidance 1.9.1" if "1.9.1" in llguidance.get_version() else llguidance.get_version()
    b.fill = lambda i: lt.fill_next_token_bitmask(matchers[i], mask, i)
    b.apply = lambda logits: lt.apply_token_bitmask_inplace(logits, mask)

    def accept(i: int, token: int) -> bool:
        assert matchers[i].consume_token(token), matchers[i].get_error()
        return bool(matchers[i].is_stopped())
    b.accept = accept
    b.reset = lambda i: matchers[i].reset()
    return b, compile_s


def engine_backend(tok: Any, vocab: int, rows: int) -> tuple[Backend, float]:
    """What worker.serve.engine runs per constrained row: llguidance's bitmask with the end tokens added once
    accepting (worker.serve.grammar.allowed), applied to a copy of the row's logits by sampling.adjust."""
    from worker.serve.grammar import Grammars, allowed
    from worker.serve.sampling import Params, adjust
    grammars = Grammars(tok, vocab)
    fmt = {"type": "json_schema", "schema": SCHEMA}
    grammars._tokenizer()  # built once per engine (on its first grammar), outside the compile time as above
    t = time.perf_counter()
    template = grammars.matcher(fmt)
    compile_s = time.perf_counter() - t
    matchers = [template.deep_copy() for _ in range(rows)]
    ends, params = [tok.eos_token_id], Params()
    masks: list[torch.Tensor] = [torch.zeros(1)] * rows
    b = Backend()
    b.name = "ftaas engine path"

    def fill(i: int) -> None:
        masks[i] = allowed(matchers[i], vocab, ends)

    def apply(logits: torch.Tensor) -> None:
        for i in range(rows):
            logits[i] = adjust(logits[i], params, {}, masks[i])

    def accept(i: int, token: int) -> bool:
        assert matchers[i].consume_token(token)
        return bool(matchers[i].is_stopped())
    b.fill, b.apply, b.accept = fill, apply, accept
    b.reset = lambda i: matchers[i].reset()
    return b, compile_s


BACKENDS = {"xgrammar": xgrammar_backend, "llguidance": llguidance_backend, "engine": engine_backend}


def run(b: Backend, rows: int, vocab: int, steps: int, eos: set[int]) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    fill_ms, apply_ms = [], []
    for _ in range(steps):
        logits = torch.randn(rows, vocab, generator=gen)
        t0 = time.perf_counter()
        for i in range(rows):
            b.fill(i)
        t1 = time.perf_counter()
        b.apply(logits)
        t2 = time.perf_counter()
        fill_ms.append((t1 - t0) * 1000)
        apply_ms.append((t2 - t1) * 1000)
        for i, token in enumerate(logits.argmax(-1).tolist()):
            if b.accept(i, token) or token in eos:
                b.reset(i)
    fill, apply = statistics.median(fill_ms), statistics.median(apply_ms)
    return {"fill_ms": fill, "apply_ms": apply, "step_ms": fill + apply, "per_row_ms": (fill + apply) / rows,
            "p90_step_ms": sorted(f + a for f, a in zip(fill_ms, apply_ms, strict=True))[int(0.9 * steps)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--only", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(args.model, Settings(device="cpu"))
    vocab = 262144 if args.model == "gemma-3-270m" else len(tok)
    eos = {tok.eos_token_id}
    print(f"vocab {vocab}, schema {json.dumps(SCHEMA)}")
    print(f"{'library':<18} {'rows':>4} {'compile s':>9} {'mask ms':>8} {'apply ms':>8} {'step ms':>8} "
          f"{'p90 ms':>7} {'ms/row':>7}")
    for make in (BACKENDS[k] for k in args.only):
        for rows in args.rows:
            b, compile_s = make(tok, vocab, rows)
            run(b, rows, vocab, 10, eos)  # warm
            r = run(b, rows, vocab, args.steps, eos)
            print(f"{b.name:<18} {rows:>4} {compile_s:>9.3f} {r['fill_ms']:>8.3f} {r['apply_ms']:>8.3f} "
                  f"{r['step_ms']:>8.3f} {r['p90_step_ms']:>7.3f} {r['per_row_ms']:>7.3f}")


if __name__ == "__main__":
    main()
