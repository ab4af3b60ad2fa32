"""Adapter inference: one continuous-batching engine per base model (worker.serve.engine), bases in an LRU.

Plain Python (no Celery). ``EnginePool.generate`` may be called from many threads at once (the generate
worker runs a thread pool): every call is queued to its base model's engine thread, which decodes all
running requests together, each with its own adapter (worker.serve.multi_lora), sampling settings and stop
strings. The trainer's before/after samples are worker/train/samples.py (HF ``generate``, one batch at a time).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import fields
from functools import partial
from typing import Any

import torch
from torch import nn

from app.core import paths
from app.core.settings import Settings
from worker.models import load_model, load_tokenizer, pick_device
from worker.nf4 import dequantize_nf4, nf4_layer_count
from worker.serve.engine import BatchEngine
from worker.serve.rows import Piece
from worker.serve.sampling import Params

log = logging.getLogger("ftaas.inference")


def _slot_bytes(model: nn.Module, rank: int, dtype: torch.dtype) -> int:
    """Memory of one adapter slot: rank x (in + out) of every targeted projection."""
    from worker.serve.multi_lora import TARGETS

    total = sum(int(getattr(m, "in_features")) + int(getattr(m, "out_features"))  # noqa: B009
                for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS)
    return total * rank * torch.empty((), dtype=dtype).element_size()


class EnginePool:
    """One BatchEngine per (base model, quantization), in an LRU: past ``base_cache_size`` the least recently
    used idle base is closed and freed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._bases: OrderedDict[tuple[str, str], BatchEngine] = OrderedDict()
        self._lock = threading.Lock()

    def _base(self, name: str, quantization: str) -> BatchEngine:
        key = (name, quantization)
        with self._lock:
            if key in self._bases:
                self._bases.move_to_end(key)
                return self._bases[key]
            while len(self._bases) >= self.settings.base_cache_size:
                idle = [k for k, b in self._bases.items() if not b.busy()]
                if not idle:
                    break
                log.info("evicting base model %s", idle[0])
                self._bases.pop(idle[0]).close()
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self._bases[key] = self._build(name, quantization)
            return self._bases[key]

    def _build(self, name: str, quantization: str) -> BatchEngine:
        s = self.settings
        device = pick_device(s)
        tokenizer = load_tokenizer(name, s)
        model = load_model(name, quantization, s)
        model.eval()  # (on the CPU, load_model turned bitsandbytes' weight repacking off)
        weights = s.serve_weights if s.serve_weights != "auto" else ("bf16" if device == "cuda" else "nf4")
        if weights == "bf16" and quantization == "nf4":
            layers = nf4_layer_count(model)
            model = dequantize_nf4(model, model.dtype)
            log.info("dequantized %d NF4 layers of %s for serving", layers, name)
        dtype: torch.dtype = model.get_input_embeddings().weight.dtype  # type: ignore[assignment]
        per_slot = _slot_bytes(model, s.serve_lora_max_rank, dtype)
        slots = max(1, min(s.adapter_cache_size, int(s.adapter_cache_mb * 2**20) // max(per_slot, 1)))
        rows = s.serve_max_batch if device == "cuda" else min(s.serve_max_batch, 8)
        log.info("serving %s: %d rows, %d adapter slots of rank %d (%.1f MB each), graphs %s", name, rows, slots,
                 s.serve_lora_max_rank, per_slot / 2**20, s.serve_cuda_graphs and device == "cuda")
        return BatchEngine(model, tokenizer, max_rows=rows, max_len=s.serve_max_len, slots=slots,
                           rank=s.serve_lora_max_rank, adapter_path=partial(paths.adapter_dir, s),
                           cuda_graphs=s.serve_cuda_graphs)

    def loaded(self) -> dict[str, list[str]]:
        """Adapters on each loaded base model, least recently used first."""
        return {f"{n}:{q}": b.loaded_adapters() for (n, q), b in list(self._bases.items())}

    def serving(self) -> dict[str, Any]:
        """What ``GET /adapters`` shows for this worker."""
        return {"bases": [{"base_model": n, "quantization": q, "adapters": b.loaded_adapters(),
                           "adapter_slots": b.adapters.size} for (n, q), b in list(self._bases.items())]}

    def submit(self, req: dict[str, Any], on_piece: Piece | None = None) -> Future[dict[str, Any]]:
        """``req``: prompts, base_model, quantization, adapter (or None) and the fields of
        worker.serve.sampling.Params (``n``, ``logprobs`` and ``echo`` may be left out).

        The result: outputs (``len(prompts) * n``, prompt-major: ``outputs[i * n + j]`` is completion j of prompt
        i), adapter, base_model, timing and ``adapter_cache`` (``hit``, ``load`` or None). Each output has
        ``text``, ``tokens``, ``finish_reason``, ``prompt_tokens`` and, with ``logprobs`` not None, ``logprobs``
        (worker/serve/logprobs.py). ``on_piece(output index, text)`` is called from the engine thread with each
        new piece of text.
        """
        t0 = time.monotonic()
        engine = self._base(req["base_model"], req["quantization"])
        base_ms = (time.monotonic() - t0) * 1000
        params = Params(**{f.name: req[f.name] for f in fields(Params) if f.name in req})
        outer: Future[dict[str, Any]] = Future()

        def done(inner: Future[dict[str, Any]]) -> None:
            if inner.exception() is not None:
                outer.set_exception(inner.exception())  # type: ignore[arg-type]
                return
            result = inner.result()
            result["timing"]["load_ms"] = round(result["timing"]["load_ms"] + base_ms, 1)
            outer.set_result({"outputs": result["outputs"], "adapter": req.get("adapter"),
                              "base_model": req["base_model"], "timing": result["timing"],
                              "adapter_cache": result["adapter_cache"]})

        engine.submit(req["prompts"], params, req.get("adapter"), on_piece).add_done_callback(done)
        return outer

    def generate(self, req: dict[str, Any], on_piece: Piece | None = None) -> dict[str, Any]:
        return self.submit(req, on_piece).result()

