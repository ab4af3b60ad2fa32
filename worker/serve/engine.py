"""Continuous batching for one base model: an engine thread that decodes every running request together.

Requests (``n`` rows per prompt) wait in a queue; between decode steps the thread admits new rows (prefilled
together, right-padded, into free rows of a static per-row KV cache), then runs one decode step for all
rows, samples each row with its own settings, streams text pieces and drops finished rows. Each row
keeps its own position, so rows that joined at different times share a step. A row's adapter is a slot
of worker.serve.multi_lora; adapters are read from disk on a loader thread (worker.serve.adapter_slots), so a
cold adapter delays only the requests that need it.

Why not transformers' own continuous batching (``generate_batch`` / paged cache): it has no per-row
adapter and one generation config for the whole batch; this needs both.

On CUDA the decode step for each batch bucket (1, 2, 4, ... max rows) is captured once as a CUDA graph
(the rows' positions, tokens and adapter masks live in static buffers), so a step is one graph replay.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from app.core.errors import UserFacingError
from worker.decoding import LENGTH, STOP, FinishReason, decode_new, end_token_ids, finished_output, has_stop
from worker.serve.adapter_slots import BASE_MODEL, AdapterSlots
from worker.serve.grammar import Grammars, allowed
from worker.serve.kv_cache import SlotCache
from worker.serve.logprobs import RowLogprobs, added_in_front, as_output, prompt_entries, record
from worker.serve.multi_lora import install
from worker.serve.rows import Piece, Request, Row
from worker.serve.sampling import Params, adjust, holdback, sample

log = logging.getLogger("ftaas.batcher")


class BatchEngine:
    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, *, max_rows: int, max_len: int,
                 slots: int, rank: int, adapter_path: Callable[[str], Path], cuda_graphs: bool,
                 prefill_tokens: int = 4096) -> None:
        self.model, self.tok = model, tokenizer
        self.device, cfg = next(model.parameters()).device, model.config
        self.dtype = model.get_input_embeddings().weight.dtype
        self.ctx, self.wrapped = install(model, slots, rank, self.dtype)
        self.rank, self.max_rows, self.max_len = rank, max_rows, max_len
        self.prefill_tokens = prefill_tokens
        self.layer_types: list[str] | None = getattr(cfg, "layer_types", None)
        self.window: int | None = getattr(cfg, "sliding_window", None)
        self.softcap: float | None = getattr(cfg, "final_logit_softcapping", None)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.graphed = cuda_graphs and self.device.type == "cuda"
        # Graphs need the whole length up front; eager (CPU) grows the cache as prompts need it.
        self.cache = SlotCache(cfg.num_hidden_layers, max_rows, cfg.num_key_value_heads, head_dim,
                               max_len if self.graphed else min(max_len, 256), self.dtype, self.device)
        self.eos = end_token_ids(tokenizer, model) | ({tokenizer.pad_token_id} - {None})  # every end token, pad
        self.vocab = int(model.get_input_embeddings().num_embeddings)  # the logits' width
        self.ends = sorted(e for e in self.eos if e < self.vocab)
        self.grammars = Grammars(tokenizer, self.vocab)  # response_format: compiled per schema, cached
        self.added = added_in_front(tokenizer)  # its leading special tokens (<bos>): never echoed
        # transformers >= 5.2x names the model's cache argument ``cache`` (``past_key_values`` before)
        params = inspect.signature(model.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        # static buffers of the decode step (rows not running hold token 0 at position 0, no adapter)
        self.ids = torch.zeros(max_rows, 1, dtype=torch.long, device=self.device)  # [rows, 1] each row's next token
        self.pos = torch.zeros(max_rows, dtype=torch.long, device=self.device)  # [rows] its position
        # host copies, written per row and sent in one copy per step (not one tiny copy per row)
        pin = self.device.type == "cuda"
        self.ids_host = torch.zeros(max_rows, 1, dtype=torch.long, pin_memory=pin)  # [rows, 1]
        self.pos_host = torch.zeros(max_rows, dtype=torch.long, pin_memory=pin)  # [rows]
        # [rows, slots * rank] 0/1: each row's adapter block of the stacked LoRA columns (zeros: the base model)
        self.lora_mask = torch.zeros(max_rows, slots * rank, dtype=self.dtype, device=self.device)
        self.key_idx = torch.arange(self.cache.length, device=self.device)  # [length] key positions for the mask
        self.adapters = AdapterSlots(self.wrapped, slots, rank, adapter_path)
        self.rows: list[Row | None] = [None] * max_rows  # [rows] the row running in each cache row
        self.waiting: list[Row] = []
        self.inbox: queue.Queue[Request] = queue.Queue()
        # batch bucket -> (its captured decode step, that step's output logits [bucket, vocab])
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_rows] + [max_rows]
        self.steps = 0
        self._stop = False
        if self.graphed:
            try:
                self._capture()
            except Exception:  # serve eagerly rather than not at all
                log.exception("CUDA graph capture failed; decoding eagerly")
                self.graphs.clear()
                torch.cuda.synchronize()
        self.thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self.thread.start()

    # -- public -----------------------------------------------------------------------------------
    def submit(self, prompts: list[str], params: Params, adapter: str | None = None,
               on_piece: Piece | None = None) -> Future[dict[str, Any]]:
        """Queue a request; its grammar compiles here (cached per schema), never on the engine thread."""
        rows = len(prompts) * params.n
        req = Request(prompts, params, adapter, on_piece, Future(), outputs=[None] * rows, left=rows)
        try:
            if high := [i for i in params.logit_bias if not 0 <= i < self.vocab]:
                raise UserFacingError("invalid_request", f"logit_bias: token id {high[0]} is not in this model's "
                                      f"vocabulary (ids 0 to {self.vocab - 1})")
            req.grammar = self.grammars.matcher(params.response_format)
        except UserFacingError as e:
            req.future.set_exception(e)
            return req.future
        self.inbox.put(req)
        return req.future

    def loaded_adapters(self) -> list[str]:
        return self.adapters.loaded()

    def busy(self) -> bool:
        return bool(self.waiting) or any(self.rows) or not self.inbox.empty()

    def close(self) -> None:
        self._stop = True
        self.inbox.put(None)  # type: ignore[arg-type]
        self.thread.join(30)
        self.adapters.close()

    # -- the model --------------------------------------------------------------------------------
    def _masks(self, full: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> Any:
        """``full``: bool [b, 1, q, k]; sliding layers also need distance < window."""
        if not self.layer_types:
            return full
        out = {"full_attention": full}
        if "sliding_attention" in self.layer_types and self.window:
            out["sliding_attention"] = full & (k > q - self.window)
        return out

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: Any) -> torch.Tensor:
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                               **{self.cache_kw: self.cache})
        return out.last_hidden_state  # type: ignore[no-any-return]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits  # type: ignore[no-any-return]

    def _decode(self, n: int) -> torch.Tensor:
        pos = self.pos[:n]
        self.cache.prefill_rows, self.cache.pos = None, pos
        self.ctx.mask = self.lora_mask[:n]
        q, k = pos[:, None, None, None], self.key_idx[None, None, None, :]  # [n, 1, 1, 1], [1, 1, 1, length]
        hidden = self._forward(self.ids[:n], pos[:, None], self._masks(k <= q, q, k))  # [n, 1, hidden]
        return self._logits(hidden[:, -1])  # [n, vocab]

    def _capture(self) -> None:
        t = time.monotonic()
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for n in self.buckets:
                    for _ in range(2):
                        self._decode(n)
            torch.cuda.current_stream().wait_stream(stream)
            pool = None
            for n in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._decode(n)
                pool = graph.pool()
                self.graphs[n] = (graph, out)
        log.info("captured %d decode graphs in %.1f s", len(self.graphs), time.monotonic() - t)

    def _prefill(self, rows: list[Row]) -> torch.Tensor:
        """Right-padded prompts of ``rows`` into their cache rows; the logits at each one's last token (and
        with echo, the prompt's logprobs from every position's)."""
        t = max(len(r.prompt) for r in rows)
        ids = torch.zeros(len(rows), t, dtype=torch.long)  # [group, longest prompt] right-padded
        for i, r in enumerate(rows):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt)
        idx = torch.tensor([r.row for r in rows], device=self.device)  # [group] their cache rows
        self.cache.prefill_rows, self.cache.pos = idx, None
        self.ctx.mask = self.lora_mask[idx]
        p = torch.arange(t, device=self.device)
        q, k = p[None, None, :, None], p[None, None, None, :]
        pos = p[None, :].expand(len(rows), t)
        hidden = self._forward(ids.to(self.device), pos, self._masks(k <= q, q, k))  # [group, t, hidden]
        for i, r in enumerate(rows):  # echo: the prompt's entries, the tokenizer's leading ones left out
            if r.lp is not None and r.req.params.echo:
                n = len(r.prompt)
                r.lp.prompt = prompt_entries(self._logits, hidden[i, :n], r.prompt, r.lp.k, min(self.added, n - 1))
        last = torch.tensor([len(r.prompt) - 1 for r in rows], device=self.device)
        return self._logits(hidden[torch.arange(len(rows), device=self.device), last])

    def _grow(self, length: int) -> None:
        """Eager mode only: a longer cache, the rows' K/V kept."""
        self.cache.grow(length)
        self.key_idx = torch.arange(length, device=self.device)

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            try:
                self._take(block=not self.waiting and not any(self.rows))
                if self._stop:
                    return
                with torch.inference_mode():
                    self._admit()
                    if any(self.rows):
                        self._step()
                    elif self.waiting:
                        time.sleep(0.002)  # only rows whose adapter is still loading
            except Exception as e:  # a broken step fails the requests in it, never the thread
                log.exception("batch step failed")
                for r in {id(x.req): x.req for x in [*self.rows, *self.waiting] if x}.values():
                    self._fail(r, e)

    def _take(self, block: bool) -> None:
        while True:
            try:
                req = self.inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            if req is None:
                return
            try:
                encoded = [self.tok(p, add_special_tokens=True)["input_ids"] for p in req.prompts]
                for ids in encoded:
                    if len(ids) + req.params.max_new_tokens > self.max_len:
                        raise UserFacingError("prompt_too_long", f"prompt ({len(ids)} tokens) + max_new_tokens "
                                              f"exceeds this worker's {self.max_len} tokens")
            except UserFacingError as e:
                self._fail(req, e)
                continue
            p = req.params
            for i, ids in enumerate(encoded):
                for j in range(p.n):
                    gen = None
                    if p.do_sample:
                        gen = torch.Generator(device=self.device)
                        gen.manual_seed(p.seed + j if p.seed is not None else
                                        int(torch.randint(0, 2**31 - 1, (1,)).item()))
                    lp = RowLogprobs(p.logprobs) if p.logprobs is not None else None
                    self.waiting.append(Row(req, i * p.n + j, ids, gen=gen, lp=lp,
                                            matcher=req.grammar.deep_copy() if req.grammar else None))

    def _adapter_slot(self, req: Request) -> int | None:
        """The slot of the request's adapter (BASE_MODEL for none), or None while it loads or no slot is free;
        marks the request a cache ``hit`` or ``load``."""
        name = req.adapter
        if name is None:
            return BASE_MODEL
        if self.adapters.holds(name):
            if req.cache is None:
                req.cache = "hit"
        else:
            req.cache = "load"
            if req.t_load is None:
                req.t_load = time.monotonic()
        return self.adapters.slot_for(name)

    def _admit(self) -> None:
        admitted: list[Row] = []
        blocked: set[int] = set()
        budget = self.prefill_tokens
        for r in list(self.waiting):
            if id(r.req) in blocked or r.req.future.done():
                continue
            free = [i for i, x in enumerate(self.rows) if x is None]
            if not free or (admitted and budget < len(r.prompt)):
                break
            try:
                slot = self._adapter_slot(r.req)
            except UserFacingError as e:
                self._fail(r.req, e)
                continue
            if slot is None:
                blocked.add(id(r.req))
                continue
            if r.req.t_start is None:
                r.req.t_start = time.monotonic()
                if r.req.t_load is not None:
                    r.req.load_ms = (r.req.t_start - r.req.t_load) * 1000
            self.waiting.remove(r)
            r.row, r.slot, r.pos = free[0], slot, len(r.prompt)
            self.rows[r.row] = r
            self.lora_mask[r.row].zero_()
            if slot != BASE_MODEL:
                self.adapters.use(slot)
                self.lora_mask[r.row, slot * self.rank:(slot + 1) * self.rank] = 1
            budget -= len(r.prompt)
            admitted.append(r)
            if len(r.prompt) + r.req.params.max_new_tokens > self.cache.length:
                self._grow(min(self.max_len, max(2 * self.cache.length, len(r.prompt) + r.req.params.max_new_tokens)))
        if admitted:
            logits = self._prefill(admitted)
            self._advance(admitted, logits, list(range(len(admitted))))

    def _step(self) -> None:
        top = max(i for i, x in enumerate(self.rows) if x is not None) + 1
        n = next(b for b in self.buckets if b >= top) if self.graphs else top
        if n in self.graphs:
            graph, out = self.graphs[n]
            graph.replay()
            logits = out
        else:
            logits = self._decode(n)
        self.steps += 1
        active = [x for x in self.rows[:n] if x is not None]
        self._advance(active, logits, [x.row for x in active])

    def _advance(self, rows: list[Row], logits: torch.Tensor, at: list[int]) -> None:
        """Pick each row's next token (``logits[at[i]]`` for ``rows[i]``), stream it, finish rows; the rest
        feed their token at the next step."""
        greedy = logits.argmax(-1).tolist()
        tokens = [self._pick(r, logits[a], greedy[a]) for r, a in zip(rows, at, strict=True)]
        record([(r.lp, a, t) for r, a, t in zip(rows, at, tokens, strict=True)
                if r.lp is not None and r.req.params.max_new_tokens and t not in self.eos], logits)
        now = time.monotonic()
        for r, token in zip(rows, tokens, strict=True):
            p = r.req.params
            if r.req.t_first is None:
                r.req.t_first = now
            finish: FinishReason | None = None
            if not p.max_new_tokens:  # echo alone: the prompt's logprobs, nothing generated
                finish = LENGTH
            elif token in self.eos:
                finish = STOP
            else:
                r.ids.append(token)
                r.counts[token] = r.counts.get(token, 0) + 1
                if r.matcher is not None and (not r.matcher.consume_token(token) or r.matcher.is_stopped()):
                    finish = STOP  # the JSON is complete (a refused token cannot be: the mask allowed it)
            if (p.stop or r.req.on_piece) and finish is None:
                new, r.prefix, r.read = decode_new(self.tok, r.ids, r.prefix, r.read)
                r.text += new
                if has_stop(r.text, p.stop):
                    finish = STOP
            if finish is None and (len(r.ids) >= p.max_new_tokens or r.pos >= self.max_len):
                finish = LENGTH
            text = r.text
            output: dict[str, Any] | None = None
            if finish:  # the whole decode once, cut at the first stop string
                whole = str(self.tok.decode(r.ids, skip_special_tokens=True))
                output = finished_output(whole, len(r.ids), finish, p.stop) | {"prompt_tokens": len(r.prompt)}
                if r.lp is not None:
                    output["logprobs"] = as_output(r.lp, self.tok, r.req.prompts[r.index // p.n] if p.echo else None)
                text = output["text"]
            if r.req.on_piece:
                safe = text if finish else holdback(text, p.stop)
                if len(safe) > r.sent:
                    r.req.on_piece(r.index, safe[r.sent:])
                    r.sent = len(safe)
            if output is not None:
                self._finish(r, output)
            else:
                self.ids_host[r.row, 0] = token
                self.pos_host[r.row] = r.pos
                r.pos += 1
        self.ids.copy_(self.ids_host, non_blocking=True)
        self.pos.copy_(self.pos_host, non_blocking=True)

    def _pick(self, r: Row, logits: torch.Tensor, greedy: int) -> int:
        """Row ``r``'s next token from its raw ``logits [vocab]``: logit_bias, penalties and its grammar's mask
        first when it has them, then greedy or temperature / top-k / top-p."""
        p = r.req.params
        if r.matcher is not None or p.adjusts:
            logits = adjust(logits, p, r.counts, None if r.matcher is None else
                            allowed(r.matcher, self.vocab, self.ends))
            greedy = int(logits.argmax())
        return sample(logits, p, r.gen) if p.do_sample else int(greedy)

    def _free_row(self, r: Row) -> None:
        if r.row >= 0 and self.rows[r.row] is r:
            self.rows[r.row] = None
            self.ids_host[r.row, 0] = 0
            self.pos_host[r.row] = 0
            self.lora_mask[r.row].zero_()
            if r.slot != BASE_MODEL:
                self.adapters.release(r.slot)

    def _finish(self, r: Row, output: dict[str, Any]) -> None:
        self._free_row(r)
        req = r.req
        req.outputs[r.index] = output
        req.left -= 1
        if req.left == 0 and not req.future.done():
            req.future.set_result(req.result())

    def _fail(self, req: Request, e: Exception) -> None:
        for r in [x for x in self.rows if x is not None and x.req is req]:
            self._free_row(r)
        self.waiting = [x for x in self.waiting if x.req is not req]
        if not req.future.done():
            req.future.set_exception(e)

