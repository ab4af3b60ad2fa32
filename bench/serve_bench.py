"""Serving benchmark: the service's batching engine (worker.serve.pool.EnginePool) on one GPU, beside the notebook's
``PeftModel.generate`` path, in one process. Prints a table last.

Model: the google/gemma-2b architecture with random weights (vocab 262,144, Gemma 3 tokenizer; built as in
bench/gpu_smoke.py), NF4-quantized on load as the service does. Adapters: random LoRA r=8 (alpha 16) on all seven
projections, saved as peft folders (adapter_config.json + adapter_model.safetensors). Load: prompts are
``Quote: <first 40 characters of a quote>`` (10 to 16 tokens), greedy, 64 new tokens (no early stop: eos is
never chosen by these random weights often enough to matter; counts are the tokens actually generated).

Scenarios per engine variant (serve weights bf16-dequantized or NF4, CUDA graphs on or off):
  single    one request at a time with a warm adapter: tokens/s, TTFT (median of the runs)
  c64       64 requests submitted at once over 8 adapters (8 each, round robin): total tokens/s, per-request
            latency p50/p95, TTFT p50/p95
  cold      first request for each of 10 never-loaded adapters (one at a time): load_ms and TTFT p50/max
  churn     100 distinct adapters used in turn (4 concurrent): peak and final allocated memory vs before
  parity    each c64 request's greedy text against the same request run alone: identical count
Notebook path: PeftModel over the NF4 base (one adapter), ``generate`` greedy 64 tokens at batch 1, 8, 32.

Usage:
  python bench/serve_bench.py --tiny                 # CPU: tiny Gemma, small counts, checks the script
  python bench/serve_bench.py --out $OUT             # GPU (see bench/RESULTS.md for the full command)
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from app.core.settings import Settings  # noqa: E402
from worker.serve.multi_lora import TARGETS  # noqa: E402
from worker.serve.pool import EnginePool  # noqa: E402

HUB_ID = "google/gemma-2b"


def log(*x: Any) -> None:
    print(*x, flush=True)


def make_adapter(path: Path, config: Any, rank: int, seed: int) -> None:
    """A random peft LoRA folder for ``config``'s shapes (B nonzero, so it changes the output)."""
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
            where = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{where}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fin, generator=g) / fin**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fout, rank, generator=g) * 0.05
    path.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), task_type="CAUSAL_LM").save_pretrained(
        str(path))
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    save_file(weights, str(path / "adapter_model.safetensors"))


def build_model(src: Path, model_dir: Path, tiny: bool, device: str) -> tuple[int, float]:
    """google/gemma-2b with random weights (or a tiny Gemma) + the Gemma 3 tokenizer (as bench/gpu_smoke.py)."""
    from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM

    t = time.monotonic()
    model_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(src / "tokenizer.json.gz") as f, open(model_dir / "tokenizer.json", "wb") as g:
        shutil.copyfileobj(f, g)
    shutil.copy(src / "tokenizer_config.json", model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = json.loads((src / "gemma-2b-config.json").read_text()) | {"vocab_size": 262144}
    if tiny:
        cfg |= dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
    for k in ("architectures", "model_type", "torch_dtype"):
        cfg.pop(k, None)
    torch.manual_seed(0)
    with torch.device(device):
        model = GemmaForCausalLM(GemmaConfig(**cfg)).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n, time.monotonic() - t


def patch_hub(model_dir: Path) -> None:
    """No hub here: point google/gemma-2b, and only it, at the local folder (the service's load path after it)."""
    import worker.models

    original = worker.models._source

    def _source(name: str, settings: Settings) -> tuple[str, dict[str, Any]]:
        return (str(model_dir), {}) if name == HUB_ID else original(name, settings)

    worker.models._source = _source


def req(prompt: str, adapter: str | None, base: str, new: int) -> dict[str, Any]:
    return {"prompts": [prompt], "base_model": base, "quantization": "nf4", "adapter": adapter,
            "max_new_tokens": new, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50,
            "seed": None, "stop": []}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))] if xs else float("nan")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mem() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def run_batch(engine: EnginePool, reqs: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]], list[float]]:
    """Submit all at once; (wall s, results, per-request latency s)."""
    done: list[float] = [0.0] * len(reqs)
    t = time.monotonic()
    futs: list[Future[dict[str, Any]]] = []
    for i, r in enumerate(reqs):
        f = engine.submit(r)
        f.add_done_callback(lambda _f, i=i: done.__setitem__(i, time.monotonic()))
        futs.append(f)
    results = [f.result() for f in futs]
    wall = time.monotonic() - t
    return wall, results, [d - t for d in done]


def bench_engine(name: str, settings: Settings, base: str, prompts: list[str], adapters: list[str],
                 cold: list[str], churn: list[str], new: int, conc: int, single_runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"variant": name}
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    t = time.monotonic()
    engine = EnginePool(settings)
    engine.generate(req(prompts[0], None, base, 2))  # load + capture
    out["startup_s"] = time.monotonic() - t
    be = next(iter(engine._bases.values()))
    out["graphs"] = len(be.graphs)
    for a in adapters:  # warm the 8 adapters
        engine.generate(req(prompts[0], a, base, 2))
    # single stream, warm adapter
    tps, ttft = [], []
    for i in range(single_runs):
        r = engine.generate(req(prompts[i % len(prompts)], adapters[0], base, new))
        ntok = r["outputs"][0]["tokens"]
        tps.append(ntok / (r["timing"]["generate_ms"] / 1000))
        ttft.append(r["timing"]["ttft_ms"])
    out |= {"single_tok_s": statistics.median(tps), "single_ttft_ms_p50": statistics.median(ttft)}
    # c64 over 8 adapters (+ parity against alone)
    reqs = [req(prompts[i % len(prompts)], adapters[i % len(adapters)], base, new) for i in range(conc)]
    run_batch(engine, reqs[: min(8, conc)])  # warm the batch buckets once
    wall, results, lat = run_batch(engine, reqs)
    ntok = sum(r["outputs"][0]["tokens"] for r in results)
    ttfts = [r["timing"]["ttft_ms"] for r in results]
    out |= {"c_tok_s": ntok / wall, "c_tokens": ntok, "c_wall_s": wall, "c_lat_p50_s": pct(lat, 50),
            "c_lat_p95_s": pct(lat, 95), "c_ttft_p50_ms": pct(ttfts, 50), "c_ttft_p95_ms": pct(ttfts, 95)}
    alone = [engine.generate(r)["outputs"][0]["text"] for r in reqs[:16]]
    out["parity"] = f"{sum(a == b['outputs'][0]['text'] for a, b in zip(alone, results, strict=False))}/{len(alone)}"
    tok = be.tok
    out["parity_first_diff_token"] = [  # where a differing text first departs (token index), if any
        next((i for i, (x, y) in enumerate(zip(tok(a)["input_ids"], tok(b["outputs"][0]["text"])["input_ids"],
                                               strict=False)) if x != y), -1)
        for a, b in zip(alone, results, strict=False) if a != b["outputs"][0]["text"]]
    # the same 64 requests streamed (a callback per new piece of text, as the generate task uses)
    pieces = [0]
    t = time.monotonic()
    futs = [engine.submit(r, lambda i, text: pieces.__setitem__(0, pieces[0] + 1)) for r in reqs]
    sres = [f.result() for f in futs]
    out |= {"stream_tok_s": sum(r["outputs"][0]["tokens"] for r in sres) / (time.monotonic() - t),
            "stream_pieces": pieces[0]}
    # joining a running batch: 63 requests decoding, one more arrives; its TTFT
    runs = [engine.submit(r | {"max_new_tokens": 4 * new}) for r in reqs[: conc - 1]]
    time.sleep(0.05)
    late = engine.generate(reqs[-1])
    out["join_ttft_ms"] = late["timing"]["ttft_ms"]
    for f in runs:
        f.result()
    base_alone = engine.generate(req(prompts[0], None, base, 16))["outputs"][0]["text"]
    # cold adapter loads, one at a time
    loads, cold_ttft = [], []
    for a in cold:
        r = engine.generate(req(prompts[1], a, base, 4))
        loads.append(r["timing"]["load_ms"])
        cold_ttft.append(r["timing"]["ttft_ms"])
    out |= {"cold_load_ms_p50": statistics.median(loads), "cold_load_ms_max": max(loads),
            "cold_ttft_ms_p50": statistics.median(cold_ttft)}
    # 100 adapters in turn, 4 at a time: memory must stay bounded
    sync()
    before = mem()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for i in range(0, len(churn), 4):
        run_batch(engine, [req(prompts[j % len(prompts)], a, base, 8) for j, a in enumerate(churn[i:i + 4])])
    sync()
    out |= {"churn_mem_before_gib": before, "churn_mem_after_gib": mem(),
            "churn_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
            "loaded_after_churn": len(be.loaded_adapters()), "slots": be.adapters.size}
    out["base_unchanged"] = engine.generate(req(prompts[0], None, base, 16))["outputs"][0]["text"] == base_alone
    out["steps"] = be.steps
    for b in list(engine._bases.values()):
        b.close()
    del engine, be
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def bench_notebook(settings: Settings, base: str, prompts: list[str], adapter: str, new: int,
                   sizes: list[int]) -> list[dict[str, Any]]:
    """The notebook's serving: PeftModel over the NF4 base, ``model.generate`` one batch at a time."""
    from peft import PeftModel

    from worker.models import load_model, load_tokenizer

    tok = load_tokenizer(base, settings)
    model = PeftModel.from_pretrained(load_model(base, "nf4", settings), str(settings.adapter_dir / adapter))
    model.eval()
    tok.padding_side = "left"
    rows = []
    for bs in sizes:
        enc = tok(prompts[:bs], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=4, do_sample=False)
            sync()
            t = time.monotonic()
            o = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            sync()
        dt = time.monotonic() - t
        ntok = (o.shape[1] - enc["input_ids"].shape[1]) * bs
        rows.append({"batch": bs, "tok_s": ntok / dt, "s": dt})
        log("notebook", rows[-1])
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", tempfile.mkdtemp()))
    ap.add_argument("--variants", default="bf16-graphs,bf16-eager,nf4-graphs")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gpu-dir", default=str(ROOT / ".gpu"))
    ap.add_argument("--no-notebook", action="store_true", help="skip the notebook path")
    a = ap.parse_args()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    cuda = torch.cuda.is_available()
    model_dir = work / "model"
    nparams, build_s = build_model(Path(a.gpu_dir), model_dir, a.tiny, "cuda" if cuda else "cpu")
    patch_hub(model_dir)
    log(f"model built: {nparams / 1e9:.3f} B params in {build_s:.1f} s")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    lines = (Path(a.gpu_dir) / "quotes.jsonl").read_text().splitlines()
    quotes = [json.loads(line)["quote"] for line in lines if line.strip()]
    prompts = [f"Quote: {q[:40]}" for q in quotes[:64]]
    n_cold, n_churn, conc, single = (3, 12, 8, 2) if a.tiny else (10, 100, 64, 5)
    names = [f"job_{i:022x}" for i in range(8 + n_cold + n_churn)]
    data = work / "data"
    t = time.monotonic()
    for i, name in enumerate(names):
        make_adapter(data / "adapters" / name, config, 8, i)
    log(f"{len(names)} adapters written in {time.monotonic() - t:.1f} s")
    adapters, cold, churn = names[:8], names[8:8 + n_cold], names[8 + n_cold:]
    new = 8 if a.tiny else a.new_tokens

    results: list[dict[str, Any]] = []
    errors: list[str] = []
    notebook: list[dict[str, Any]] = []
    try:  # first: a variant whose CUDA graph capture fails must not take the notebook figures with it
        if a.no_notebook:
            raise StopIteration
        settings = Settings(data_dir=data, device="cuda" if cuda else "cpu")
        notebook = bench_notebook(settings, HUB_ID, prompts, adapters[0], new, [1, 8] if a.tiny else [1, 8, 32])
    except StopIteration:
        pass
    except Exception as e:
        traceback.print_exc()
        errors.append(f"notebook: {type(e).__name__}: {e}")
    for variant in a.variants.split(","):
        weights, mode = variant.split("-")
        settings = Settings(data_dir=data, device="cuda" if cuda else "cpu", serve_weights=weights,  # type: ignore[arg-type]
                            serve_cuda_graphs=mode == "graphs", adapter_cache_size=8, serve_lora_max_rank=16,
                            serve_max_batch=64, serve_max_len=512)
        try:
            r = bench_engine(variant, settings, HUB_ID, prompts, adapters, cold, churn, new, conc, single)
            results.append(r)
            log("RESULT", json.dumps(r))
        except Exception as e:
            traceback.print_exc()
            errors.append(f"{variant}: {type(e).__name__}: {e}")
    (out_dir / "serve_results.json").write_text(json.dumps({"engine": results, "notebook": notebook,
                                                            "errors": errors}, indent=1))
    dev = torch.cuda.get_device_name(0) if cuda else "cpu"
    log(f"\nSERVE TABLE ({dev}; {'tiny' if a.tiny else 'gemma-2b arch'}, random weights, NF4 base, r=8 adapters, "
        f"greedy {new} new tokens; prompts 'Quote: <40 chars>'; c = {conc} concurrent over 8 adapters)")
    log("| variant | single tok/s | single TTFT p50 ms | c tok/s | c latency p50/p95 s | c TTFT p50/p95 ms | "
        "cold load p50/max ms | cold TTFT p50 ms | mem before/after/peak 100-adapter churn GiB | parity alone=batch "
        "| base unchanged | graphs |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        log(f"| {r['variant']} | {r['single_tok_s']:.1f} | {r['single_ttft_ms_p50']:.1f} | {r['c_tok_s']:.0f} | "
            f"{r['c_lat_p50_s']:.2f}/{r['c_lat_p95_s']:.2f} | {r['c_ttft_p50_ms']:.0f}/{r['c_ttft_p95_ms']:.0f} | "
            f"{r['cold_load_ms_p50']:.0f}/{r['cold_load_ms_max']:.0f} | {r['cold_ttft_ms_p50']:.0f} | "
            f"{r['churn_mem_before_gib']:.2f}/{r['churn_mem_after_gib']:.2f}/{r['churn_peak_gib']:.2f} | "
            f"{r['parity']} | {r['base_unchanged']} | {r['graphs']} |")
    log("| variant | c streamed tok/s (pieces) | TTFT joining 63 running ms | parity first differing token |")
    log("|---|---|---|---|")
    for r in results:
        log(f"| {r['variant']} | {r['stream_tok_s']:.0f} ({r['stream_pieces']}) | {r['join_ttft_ms']:.0f} | "
            f"{r['parity_first_diff_token']} |")
    for n in notebook:
        log(f"| notebook PeftModel.generate batch {n['batch']} | {n['tok_s']:.1f} tok/s ({n['s']:.2f} s) |")
    for e in errors:
        log(f"ERROR {e}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
