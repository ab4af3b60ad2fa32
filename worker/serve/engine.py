"""Continuous batching for one base model: an engine thread that decodes every running request together.

Requests (one row per prompt) wait in a queue; between decode steps the thread admits new rows (prefilled
together, right-padded, into free rows of a static per-row KV cache), then runs one decode step for all
rows, samples each row with its own settings, streams text pieces and drops finished rows. Each row
keeps its own position, so rows that joined at different times share a step. A row's adapter is a slot
of worker.serve.multi_lora; adapters are read from disk on a loader thread, so a cold adapter delays only the
requests that need it.

Why not transformers' own continuous batching (``generate_batch`` / paged cache): it has no per-row
adapter and one generation config for the whole batch; this needs both.

On CUDA the decode step for each batch bucket (1, 2, 4, ... max rows) is captured once as a CUDA graph
(the rows' positions, tokens and adapter masks live in static buffers), so a step is one graph replay.
"""

from __future__ import annotations

import inspect
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from app.core.errors import UserFacingError
from worker.serve.multi_lora import AdapterWeights, install, read_adapter, write_slot

log = logging.getLogger("ftaas.batcher")
Piece = Callable[[int, str], None]  # (prompt index, new text)
ADAPTER_ID = re.compile(r"job_[0-9a-f]{22}")


class SlotCache:
    """Static K/V per layer, ``[rows, kv_heads, length, head_dim]``; each row writes at its own position.

    Prefill mode writes a group of rows from position 0 and attends over the prompt alone; decode mode
    writes one token per row at ``pos[row]`` and returns the first ``n`` rows' whole cache (the mask hides
    what a row has not written)."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, length: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (rows, kv_heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows_idx = torch.arange(rows, device=device)
        self.prefill_rows: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.length = length
        self.is_compileable = True

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self.prefill_rows is not None:
            t = key.shape[2]
            k[self.prefill_rows, :, :t] = key
            v[self.prefill_rows, :, :t] = value
            return key, value
        assert self.pos is not None
        n = key.shape[0]
        k[self.rows_idx[:n], :, self.pos] = key[:, :, 0]
        v[self.rows_idx[:n], :, self.pos] = value[:, :, 0]
        return k[:n], v[:n]


@dataclass
class Params:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class _Request:
    prompts: list[str]
    params: Params
    adapter: str | None
    on_piece: Piece | None
    future: Future[dict[str, Any]]
    t_submit: float = field(default_factory=time.monotonic)
    t_start: float | None = None
    t_first: float | None = None
    t_load: float | None = None
    load_ms: float = 0.0
    cache: str | None = None
    outputs: list[dict[str, Any] | None] = field(default_factory=list)
    left: int = 0


@dataclass
class _Row:
    req: _Request
    index: int
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    row: int = -1
    slot: int = -1
    pos: int = 0
    sent: int = 0
    gen: torch.Generator | None = None
    text: str = ""  # decoded so far (kept only for stop strings and streaming)
    prefix: int = 0
    read: int = 0


class BatchEngine:
    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, *, max_rows: int, max_len: int,
                 slots: int, rank: int, adapter_dir: Any, cuda_graphs: bool, prefill_tokens: int = 4096) -> None:
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        cfg = model.config
        self.dtype = model.get_input_embeddings().weight.dtype
        self.ctx, self.wrapped = install(model, slots, rank, self.dtype)
        self.rank, self.max_rows, self.max_len, self.adapter_dir = rank, max_rows, max_len, adapter_dir
        self.prefill_tokens = prefill_tokens
        self.layer_types: list[str] | None = getattr(cfg, "layer_types", None)
        self.window: int | None = getattr(cfg, "sliding_window", None)
        self.softcap: float | None = getattr(cfg, "final_logit_softcapping", None)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.graphed = cuda_graphs and self.device.type == "cuda"
        # Graphs need the whole length up front; eager (CPU) grows the cache as prompts need it.
        self.cache = SlotCache(cfg.num_hidden_layers, max_rows, cfg.num_key_value_heads, head_dim,
                               max_len if self.graphed else min(max_len, 256), self.dtype, self.device)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [tokenizer.eos_token_id, tokenizer.pad_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]
        self.eos = {e for e in eos if e is not None}
        # transformers >= 5.2x names the model's cache argument ``cache`` (``past_key_values`` before)
        params = inspect.signature(model.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        # static buffers of the decode step (rows not running hold token 0 at position 0, no adapter)
        self.ids = torch.zeros(max_rows, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        # host copies, written per row and sent in one copy per step (not one tiny copy per row)
        pin = self.device.type == "cuda"
        self.ids_host = torch.zeros(max_rows, 1, dtype=torch.long, pin_memory=pin)
        self.pos_host = torch.zeros(max_rows, dtype=torch.long, pin_memory=pin)
        self.lora_mask = torch.zeros(max_rows, slots * rank, dtype=self.dtype, device=self.device)
        self.key_idx = torch.arange(self.cache.length, device=self.device)
        # adapters: slot LRU (oldest first) and how many running rows use each slot
        self.slot_of: OrderedDict[str, int] = OrderedDict()
        self.free_slots = list(range(slots))
        self.slot_users = [0] * slots
        self.loading: dict[str, Future[AdapterWeights]] = {}
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")
        self.rows: list[_Row | None] = [None] * max_rows
        self.waiting: list[_Row] = []
        self.inbox: queue.Queue[_Request] = queue.Queue()
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
        req = _Request(prompts, params, adapter, on_piece, Future(), outputs=[None] * len(prompts),
                       left=len(prompts))
        self.inbox.put(req)
        return req.future

    def loaded_adapters(self) -> list[str]:
        return list(self.slot_of)

    def busy(self) -> bool:
        return bool(self.waiting) or any(self.rows) or not self.inbox.empty()

    def close(self) -> None:
        self._stop = True
        self.inbox.put(None)  # type: ignore[arg-type]
        self.thread.join(30)
        self.loader.shutdown(wait=False)

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
        q, k = pos[:, None, None, None], self.key_idx[None, None, None, :]
        hidden = self._forward(self.ids[:n], pos[:, None], self._masks(k <= q, q, k))
        return self._logits(hidden[:, -1])

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

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        """Right-padded prompts of ``rows`` into their cache rows; the logits at each one's last token."""
        t = max(len(r.prompt) for r in rows)
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt)
        idx = torch.tensor([r.row for r in rows], device=self.device)
        self.cache.prefill_rows, self.cache.pos = idx, None
        self.ctx.mask = self.lora_mask[idx]
        p = torch.arange(t, device=self.device)
        q, k = p[None, None, :, None], p[None, None, None, :]
        pos = p[None, :].expand(len(rows), t)
        hidden = self._forward(ids.to(self.device), pos, self._masks(k <= q, q, k))
        last = torch.tensor([len(r.prompt) - 1 for r in rows], device=self.device)
        return self._logits(hidden[torch.arange(len(rows), device=self.device), last])

    def _grow(self, length: int) -> None:
        """Eager mode only: a longer cache, the rows' K/V kept."""
        c = self.cache
        for layer in (c.k, c.v):
            for i, old in enumerate(layer):
                new = old.new_zeros(*old.shape[:2], length, old.shape[3])
                new[:, :, : c.length] = old
                layer[i] = new
        c.length = length
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
            for i, ids in enumerate(encoded):
                gen = None
                if req.params.do_sample:
                    gen = torch.Generator(device=self.device)
                    gen.manual_seed(req.params.seed if req.params.seed is not None else
                                    int(torch.randint(0, 2**31 - 1, (1,)).item()))
                self.waiting.append(_Row(req, i, ids, gen=gen))

    def _adapter_slot(self, req: _Request) -> int | None:
        """The slot of the request's adapter (-1 for none), or None while it loads or no slot is free."""
        name = req.adapter
        if name is None:
            return -1
        if not ADAPTER_ID.fullmatch(name):  # checked before it becomes a path
            raise UserFacingError("adapter_not_found", f"no adapter {name!r}")
        if name in self.slot_of:
            self.slot_of.move_to_end(name)
            if req.cache is None:
                req.cache = "hit"
            return self.slot_of[name]
        req.cache = "load"
        if req.t_load is None:
            req.t_load = time.monotonic()
        fut = self.loading.get(name)
        if fut is None:
            self.loading[name] = self.loader.submit(self._read, name, time.monotonic())
            return None
        if not fut.done():
            return None
        if fut.exception() is not None:
            del self.loading[name]
            fut.result()  # raises UserFacingError for a missing or unsupported adapter
        if not self.free_slots:
            idle = [a for a, s in self.slot_of.items() if self.slot_users[s] == 0]
            if not idle:
                return None
            self.free_slots.append(self.slot_of.pop(idle[0]))
            log.info("evicting adapter %s", idle[0])
        weights = self.loading.pop(name).result()
        slot = self.free_slots.pop()
        write_slot(self.wrapped, slot, weights)
        self.slot_of[name] = slot
        req.cache = "load"
        return slot

    def _read(self, name: str, t: float) -> AdapterWeights:
        weights = read_adapter(self.adapter_dir / name, name, self.rank, set(self.wrapped))
        log.info("read adapter %s (%.1f MB) in %.0f ms", name, weights.nbytes / 1e6, (time.monotonic() - t) * 1e3)
        return weights

    def _admit(self) -> None:
        admitted: list[_Row] = []
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
            if slot >= 0:
                self.slot_users[slot] += 1
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

    def _advance(self, rows: list[_Row], logits: torch.Tensor, at: list[int]) -> None:
        """Pick each row's next token (``logits[at[i]]`` for ``rows[i]``), stream it, finish rows; the rest
        feed their token at the next step."""
        greedy = logits.argmax(-1).tolist()
        now = time.monotonic()
        for i, r in enumerate(rows):
            p = r.req.params
            token = int(greedy[at[i]]) if not p.do_sample else _sample(logits[at[i]], p, r.gen)
            if r.req.t_first is None:
                r.req.t_first = now
            finish = None
            if token in self.eos:
                finish = "stop"
            else:
                r.ids.append(token)
            if (p.stop or r.req.on_piece) and finish is None:
                self._detokenize(r)
                if any(s in r.text for s in p.stop):
                    finish = "stop"
            if finish is None and (len(r.ids) >= p.max_new_tokens or r.pos >= self.max_len):
                finish = "length"
            text = r.text
            if finish:  # the whole decode once, cut at the first stop string
                text = str(self.tok.decode(r.ids, skip_special_tokens=True))
                cuts = [text.index(s) for s in p.stop if s in text]
                if cuts:
                    text, finish = text[: min(cuts)], "stop"
            if r.req.on_piece:
                safe = text if finish else _holdback(text, p.stop)
                if len(safe) > r.sent:
                    r.req.on_piece(r.index, safe[r.sent:])
                    r.sent = len(safe)
            if finish:
                self._finish(r, {"text": text, "tokens": len(r.ids), "finish_reason": finish})
            else:
                self.ids_host[r.row, 0] = token
                self.pos_host[r.row] = r.pos
                r.pos += 1
        self.ids.copy_(self.ids_host, non_blocking=True)
        self.pos.copy_(self.pos_host, non_blocking=True)

    def _detokenize(self, r: _Row) -> None:
        """Extend ``r.text`` by the newest token's text, decoding only the last few tokens (a whole decode per
        token per row costs O(length) each step); the window keeps one token before the new ones so a
        tokenizer's word-start handling sees the same context (as vLLM's incremental detokenizer)."""
        before = str(self.tok.decode(r.ids[r.prefix:r.read], skip_special_tokens=True))
        after = str(self.tok.decode(r.ids[r.prefix:], skip_special_tokens=True))
        if len(after) > len(before) and not after.endswith("\ufffd"):
            r.text += after[len(before):]
            r.prefix, r.read = r.read, len(r.ids)

    def _release(self, r: _Row) -> None:
        if r.row >= 0 and self.rows[r.row] is r:
            self.rows[r.row] = None
            self.ids_host[r.row, 0] = 0
            self.pos_host[r.row] = 0
            self.lora_mask[r.row].zero_()
            if r.slot >= 0:
                self.slot_users[r.slot] -= 1

    def _finish(self, r: _Row, output: dict[str, Any]) -> None:
        self._release(r)
        req = r.req
        req.outputs[r.index] = output
        req.left -= 1
        if req.left == 0 and not req.future.done():
            end = time.monotonic()
            start = req.t_start or end
            req.future.set_result({
                "outputs": req.outputs, "adapter_cache": req.cache,
                "timing": {"load_ms": round(req.load_ms, 1), "generate_ms": round((end - start) * 1000, 1),
                           "engine_ms": round((end - req.t_submit) * 1000, 1),
                           "ttft_ms": round(((req.t_first or end) - req.t_submit) * 1000, 1)}})

    def _fail(self, req: _Request, e: Exception) -> None:
        for r in [x for x in self.rows if x is not None and x.req is req]:
            self._release(r)
        self.waiting = [x for x in self.waiting if x.req is not req]
        if not req.future.done():
            req.future.set_exception(e)


def _sample(logits: torch.Tensor, p: Params, gen: torch.Generator | None) -> int:
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


def _holdback(text: str, stop: list[str]) -> str:
    """What may be streamed now: not a trailing partial character, nor a tail that could begin a stop string."""
    text = text.rstrip("\ufffd")
    keep = len(text)
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]
