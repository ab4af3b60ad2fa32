"""The batching engine alone (no Celery): mixed-adapter batches give each request exactly what it gets alone,
per-request sampling and stop strings inside a shared batch, streamed pieces, the adapter slot LRU, and
adapters read from safetensors only. Adapters are real peft folders with random weights (training one per
test would only slow the tests down; tests/serve/test_pool.py serves trained ones)."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from transformers import AutoConfig

from app.core.errors import UserFacingError
from app.core.settings import Settings
from worker.models import builtin_path, load_model, load_tokenizer
from worker.serve.multi_lora import TARGETS
from worker.serve.pool import EnginePool
from worker.train.samples import generate_texts

PROMPTS = ["Quote: Life is", "Quote: Be yourself; everyone else is already taken", "Quote: The only way to do"]


def make_adapter(path: Path, config: Any, seed: int, rank: int = 8, scale: float = 0.05) -> None:
    """A peft LoRA folder with random A and B on every projection (B nonzero, so it changes the output)."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    head = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name in TARGETS:
            fin, fout = shapes[name]
            where = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{where}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fin, generator=g) / fin**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fout, rank, generator=g) * scale
    path.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), task_type="CAUSAL_LM").save_pretrained(
        str(path))
    save_file(tensors, str(path / "adapter_model.safetensors"))


def req(prompt: str | list[str], adapter: str | None = None, base: str = "tiny-gemma", **kw: Any) -> dict[str, Any]:
    return {"prompts": [prompt] if isinstance(prompt, str) else prompt, "base_model": base, "quantization": "nf4",
            "adapter": adapter, "max_new_tokens": 10, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
            "top_k": 50, "seed": None, "stop": []} | kw


def names(n: int, start: int = 0) -> list[str]:
    return [f"job_{i:022x}" for i in range(start, start + n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, list[str]]:
    root = tmp_path_factory.mktemp("engine")
    settings = Settings(data_dir=root, device="cpu", adapter_cache_size=3)
    config = AutoConfig.from_pretrained(str(builtin_path("tiny-gemma", settings)))
    adapters = names(6)
    for i, name in enumerate(adapters):
        make_adapter(settings.adapter_dir / name, config, seed=i, scale=0.5)
    return settings, adapters


def texts(result: dict[str, Any]) -> list[str]:
    return [o["text"] for o in result["outputs"]]


def test_mixed_batch_equals_alone(tiny: tuple[Settings, list[str]]) -> None:
    """Base, three adapters, greedy and seeded sampling, a stop string, one request of two prompts: submitted
    at once they share decode steps, and each gets what it gets alone."""
    settings, (a, b, c, *_) = tiny
    engine = EnginePool(settings)
    reqs = [req(PROMPTS[0]), req(PROMPTS[1], a), req(PROMPTS[2], b, max_new_tokens=14),
            req(PROMPTS[0], c, do_sample=True, seed=3, temperature=0.9, top_p=0.9, top_k=20),
            req(PROMPTS[:2], a, max_new_tokens=6), req(PROMPTS[1], None, do_sample=True, seed=5)]
    alone = [texts(engine.generate(r)) for r in reqs]
    steps = engine._bases[("tiny-gemma", "nf4")].steps
    futures: list[Future[dict[str, Any]]] = [engine.submit(r) for r in reqs]
    together = [texts(f.result()) for f in futures]
    assert together == alone
    assert engine._bases[("tiny-gemma", "nf4")].steps - steps < 14 + 3, "the requests must share decode steps"
    assert alone[1][0] != texts(engine.generate(req(PROMPTS[1])))[0], "an adapter must change the output"
    again = texts(engine.generate(reqs[3]))
    assert again == alone[3], "a seeded sample is reproducible"


def test_stop_strings_and_streamed_pieces(tiny: tuple[Settings, list[str]]) -> None:
    settings, (a, *_) = tiny
    engine = EnginePool(settings)
    full = engine.generate(req(PROMPTS[0], a, max_new_tokens=12))["outputs"][0]
    assert full["finish_reason"] == "length" and full["tokens"] == 12
    stop = full["text"][len(full["text"]) // 2:][:3]
    pieces: list[tuple[int, str]] = []
    cut = engine.generate(req(PROMPTS[0], a, max_new_tokens=12, stop=[stop]),
                          on_piece=lambda i, t: pieces.append((i, t)))["outputs"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][: full["text"].index(stop)]
    assert "".join(t for _, t in pieces) == cut["text"], "streamed pieces add up to the text, stop string held back"
    both: list[tuple[int, str]] = []
    out = engine.generate(req(PROMPTS[:2], None, max_new_tokens=8), on_piece=lambda i, t: both.append((i, t)))
    for i, o in enumerate(out["outputs"]):
        assert "".join(t for j, t in both if j == i) == o["text"]
    assert len(both) > 2, "one piece per new token, not one per request"


def test_adapter_slots_are_an_lru_and_reload_identically(tiny: tuple[Settings, list[str]]) -> None:
    settings, adapters = tiny
    engine = EnginePool(settings)
    first = {a: texts(engine.generate(req(PROMPTS[1], a))) for a in adapters}
    loaded = engine.loaded()["tiny-gemma:nf4"]
    assert loaded == adapters[-3:], "three slots keep the three most recently used"
    res = engine.generate(req(PROMPTS[1], adapters[0]))
    assert res["adapter_cache"] == "load" and texts(res) == first[adapters[0]]
    assert engine.generate(req(PROMPTS[1], adapters[0]))["adapter_cache"] == "hit"
    assert len(set(map(tuple, first.values()))) > 1


def test_unservable_adapters_are_user_errors(tiny: tuple[Settings, list[str]], tmp_path: Path) -> None:
    settings, (a, *_) = tiny
    engine = EnginePool(settings)
    pickled = settings.adapter_dir / names(1, 90)[0]
    pickled.mkdir(parents=True)
    (pickled / "adapter_config.json").write_text((settings.adapter_dir / a / "adapter_config.json").read_text())
    torch.save({}, pickled / "adapter_model.bin")
    big = settings.adapter_dir / names(1, 91)[0]
    make_adapter(big, AutoConfig.from_pretrained(str(builtin_path("tiny-gemma", settings))), 0, rank=32)
    cases = {names(1, 99)[0]: "adapter_not_found", pickled.name: "adapter_unsupported",
             big.name: "adapter_unsupported", "../job_x": "adapter_not_found"}
    running = engine.submit(req(PROMPTS[0], max_new_tokens=20))
    for name, code in cases.items():
        with pytest.raises(UserFacingError) as e:
            engine.generate(req(PROMPTS[0], name))
        assert e.value.code == code, name
    assert running.result()["outputs"][0]["tokens"] == 20, "a failing adapter never disturbs running requests"
    assert json.loads((big / "adapter_config.json").read_text())["r"] == 32


def test_gemma3_270m_matches_peft_generate_alone_and_batched(tmp_path: Path) -> None:
    """The real model (sliding-window layers, NF4): the engine's greedy text equals peft + HF generate, with
    and without an adapter, alone and in a mixed batch."""
    settings = Settings(data_dir=tmp_path, device="cpu")
    config = AutoConfig.from_pretrained(str(builtin_path("gemma-3-270m", settings)))
    (adapter,) = names(1, 50)
    make_adapter(settings.adapter_dir / adapter, config, seed=1, scale=0.02)
    prompts = PROMPTS[:2]
    tok = load_tokenizer("gemma-3-270m", settings)
    model = load_model("gemma-3-270m", "nf4", settings)
    model.eval()
    base_ref = [generate_texts(model, tok, [p], 8)[0]["text"] for p in prompts]
    peft = PeftModel.from_pretrained(model, str(settings.adapter_dir / adapter))
    peft.eval()
    tuned_ref = [generate_texts(peft, tok, [p], 8)[0]["text"] for p in prompts]
    del model, peft
    assert tuned_ref != base_ref
    engine = EnginePool(settings)
    reqs = [req(p, ad, "gemma-3-270m", max_new_tokens=8) for ad in (None, adapter) for p in prompts]
    alone = [texts(engine.generate(r))[0] for r in reqs]
    assert alone == base_ref + tuned_ref
    futures = [engine.submit(r) for r in reqs]
    assert [texts(f.result())[0] for f in futures] == alone
