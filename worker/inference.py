"""Adapter inference: base models loaded once per process, LoRA adapters in a bounded LRU.

Plain Python (no Celery). One engine serves the base model and any number of adapters trained on
it: peft loads each adapter beside the others on one PeftModel and switches with ``set_adapter``;
base-model requests run with the adapters disabled.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from app.settings import Settings
from worker.errors import UserFacingError
from worker.models import load_model, load_tokenizer

log = logging.getLogger("ftaas.inference")


def _no_cpu_4bit_packing(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking NF4 weights for the CPU at the first no-grad forward.

    On CPUs with AVX512-BF16, bnb 0.50.2 repacks the weights in place; peft adapters loaded after
    that (peft 0.21.2) then produce garbage, and the base model too once they are loaded. The packed
    path is faster (gemma-3-270m, 32 greedy tokens here: 1.38 s vs 2.37 s), but correct output with
    adapters coming and going matters more. GPUs are not affected.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010


@dataclass
class _Base:
    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    adapters: OrderedDict[str, None] = field(default_factory=OrderedDict)  # LRU, oldest first


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._bases: OrderedDict[tuple[str, str], _Base] = OrderedDict()

    # -- caches ---------------------------------------------------------------------------------
    def _base(self, name: str, quantization: str) -> _Base:
        key = (name, quantization)
        if key in self._bases:
            self._bases.move_to_end(key)
            return self._bases[key]
        while len(self._bases) >= self.settings.base_cache_size:
            old, _ = self._bases.popitem(last=False)
            log.info("evicting base model %s", old)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        tokenizer = load_tokenizer(name, self.settings)
        model = load_model(name, quantization, self.settings)
        model.eval()
        _no_cpu_4bit_packing(model)
        self._bases[key] = _Base(model, tokenizer)
        return self._bases[key]

    def _activate(self, base: _Base, adapter: str) -> bool:
        """Make ``adapter`` the active one; True when it had to be loaded, False when it was cached."""
        loaded = adapter not in base.adapters
        if not loaded:
            base.adapters.move_to_end(adapter)
        else:
            path = self.settings.adapter_dir / adapter
            if not (path / "adapter_config.json").is_file():
                raise UserFacingError("adapter_not_found", f"adapter {adapter} has no files on this worker")
            if isinstance(base.model, PeftModel):
                base.model.load_adapter(str(path), adapter_name=adapter)
            else:
                base.model = PeftModel.from_pretrained(base.model, str(path), adapter_name=adapter)
            base.model.eval()
            base.adapters[adapter] = None
            while len(base.adapters) > self.settings.adapter_cache_size:
                old, _ = base.adapters.popitem(last=False)
                base.model.set_adapter(adapter)
                base.model.delete_adapter(old)
        assert isinstance(base.model, PeftModel)
        base.model.set_adapter(adapter)
        return loaded

    def loaded(self) -> dict[str, list[str]]:
        return {f"{n}:{q}": list(b.adapters) for (n, q), b in self._bases.items()}

    # -- generation -----------------------------------------------------------------------------
    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        """``req``: prompts, base_model, quantization, adapter (or None) and the sampling fields.

        With an adapter, ``adapter_cache`` in the result says whether it was a ``hit`` or a ``load``.
        """
        t0 = time.monotonic()
        base = self._base(req["base_model"], req["quantization"])
        cache = None
        if req.get("adapter"):
            cache = "load" if self._activate(base, req["adapter"]) else "hit"
        load_ms = (time.monotonic() - t0) * 1000

        t1 = time.monotonic()
        params = {k: req[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed", "stop")}
        base_only = isinstance(base.model, PeftModel) and not req.get("adapter")
        with base.model.disable_adapter() if base_only else nullcontext():  # type: ignore[union-attr,operator]
            outputs = generate_texts(base.model, base.tokenizer, req["prompts"], **params)
        gen_ms = (time.monotonic() - t1) * 1000
        return {"outputs": outputs, "adapter": req.get("adapter"), "base_model": req["base_model"],
                "timing": {"load_ms": round(load_ms, 1), "generate_ms": round(gen_ms, 1)}, "adapter_cache": cache}


def generate_texts(model: Any, tok: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                   seed: int | None = None, stop: list[str] | None = None) -> list[dict[str, Any]]:
    """Continuations of left-padded ``prompts``: text (prompt excluded), token count, finish reason."""
    tok.padding_side = "left"  # decoder-only batches pad on the left
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                              "pad_token_id": tok.pad_token_id}
    if do_sample:
        kwargs |= {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    else:
        kwargs |= {"temperature": None, "top_p": None, "top_k": None}
    if stop:
        kwargs |= {"stop_strings": stop, "tokenizer": tok}
    if seed is not None:
        set_seed(seed)
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    return [_decode(tok, row, stop or []) for row in out[:, enc["input_ids"].shape[1]:]]


def _decode(tok: PreTrainedTokenizerBase, row: torch.Tensor, stop: list[str]) -> dict[str, Any]:
    ids = row.tolist()
    finish = "length"
    eos = {tok.eos_token_id, tok.pad_token_id} - {None}
    for i, t in enumerate(ids):
        if t in eos:
            ids, finish = ids[:i], "stop"
            break
    text = tok.decode(ids, skip_special_tokens=True)
    cuts = [text.index(s) for s in stop if s in text]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return {"text": text, "tokens": len(ids), "finish_reason": finish}
