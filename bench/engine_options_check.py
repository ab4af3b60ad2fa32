"""The serving engine's per-row options under CUDA graphs, fp32 and bf16: a tiny random Gemma (the real Gemma 3
vocabulary), one batch of rows that each ask for something else (logprobs, n, echo, a JSON grammar, penalties
and logit_bias; base and adapter rows), run graphed and eager; checks graphed == eager, logprobs against a
direct forward, and that the grammar rows parse. Rehearse on the CPU with ``--device cpu`` (no graphs).

    python bench/engine_options_check.py --tokenizer ~/.cache/ftaas/models/tiny-gemma [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM

from worker.serve.engine import BatchEngine
from worker.serve.multi_lora import TARGETS
from worker.serve.sampling import Params

PROMPTS = ["Quote: Life is", "Quote: Be yourself; everyone else is already taken", "Quote: The only way to do"]
#: Bounded (enums), so that even a random model's rows finish: a grammar-complete row must end with "stop".
SCHEMA = {"type": "object", "properties": {"author": {"enum": ["Twain", "Wilde", "Austen"]},
                                           "year": {"enum": [1895, 1905, 1950]}},
          "required": ["author", "year"], "additionalProperties": False}
ADAPTER = "job_" + "0" * 21 + "7"


def tiny(tok: Any) -> GemmaForCausalLM:
    cfg = GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return GemmaForCausalLM(cfg).eval()


def write_adapter(folder: Path) -> None:
    g = torch.Generator().manual_seed(4)
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    tensors = {}
    for layer in range(2):
        for t in TARGETS:
            fin, fout = shapes[t]
            where = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{where}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, fin, generator=g) / fin**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fout, 8, generator=g) * 0.5
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), task_type="CAUSAL_LM").save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


REQUESTS: list[tuple[str, list[str], dict[str, Any], bool]] = [  # name, prompts, params, adapter row
    ("greedy logprobs=5", PROMPTS[:2], {"max_new_tokens": 12, "logprobs": 5}, False),
    ("greedy logprobs=5 adapter", PROMPTS[:2], {"max_new_tokens": 12, "logprobs": 5}, True),
    ("sampled n=3 adapter", [PROMPTS[2]], {"max_new_tokens": 10, "logprobs": 3, "do_sample": True, "seed": 5,
                                            "n": 3, "temperature": 0.7, "top_k": 20}, True),
    ("echo only adapter", [PROMPTS[1]], {"max_new_tokens": 0, "logprobs": 2, "echo": True}, True),
    ("json_object greedy", [PROMPTS[0]], {"max_new_tokens": 96, "response_format": {"type": "json_object"}}, False),
    ("json_schema n=2 adapter", [PROMPTS[1]], {"max_new_tokens": 96, "do_sample": True, "seed": 3, "n": 2,
                                                "response_format": {"type": "json_schema", "schema": SCHEMA}}, True),
    ("penalties + bias", [PROMPTS[2]], {"max_new_tokens": 16, "presence_penalty": 1.0, "frequency_penalty": 1.5,
                                         "logit_bias": {"1": -100.0}}, False),
]


def run(base: Any, tok: Any, device: str, dtype: torch.dtype, graphs: bool, adapters: Path) -> list[dict[str, Any]]:
    eng = BatchEngine(copy.deepcopy(base).to(device, dtype).eval(), tok, max_rows=16, max_len=256, slots=2, rank=8,
                      adapter_path=lambda n: adapters / n, cuda_graphs=graphs)
    futures = [eng.submit(prompts, Params(**params), ADAPTER if ad else None) for _, prompts, params, ad in REQUESTS]
    results = [f.result(timeout=600) for f in futures]
    eng.close()
    return results


def direct(model: Any, ids: list[int], device: str) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device=device)).logits[0].float().log_softmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    base, adapters = tiny(tok), Path("/tmp/engine-options-adapters")
    write_adapter(adapters / ADAPTER)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        tol = 2e-3 if dtype is torch.float32 else 0.15
        t = time.monotonic()
        graphed = run(base, tok, args.device, dtype, args.device == "cuda", adapters)
        eager = run(base, tok, args.device, dtype, False, adapters)
        ref_base = copy.deepcopy(base).to(args.device, dtype).eval()
        ref_ad = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters / ADAPTER)).to(args.device, dtype).eval()
        for (name, prompts, params, ad), g, e in zip(REQUESTS, graphed, eager, strict=True):
            same = [og["text"] == oe["text"] for og, oe in zip(g["outputs"], e["outputs"], strict=True)]
            worst, parsed, scored = 0.0, "", False
            n = params.get("n", 1)
            for i, out in enumerate(g["outputs"]):
                if "logprobs" in out and out["logprobs"] is not None:
                    prompt_ids = tok(prompts[i // n])["input_ids"]
                    lp, scored = out["logprobs"], True
                    full = ([prompt_ids[0], *lp["token_ids"]] if params.get("echo")
                            else [*prompt_ids, *lp["token_ids"]])
                    ref = direct(ref_ad if ad else ref_base, full, args.device)
                    start = 1 if params.get("echo") else len(prompt_ids)
                    want = [ref[p - 1, full[p]].item() for p in range(start, len(full))]
                    worst = max([worst, *(abs(a - b) for a, b in zip(want, lp["token_logprobs"], strict=True))])
                if "response_format" in params:
                    try:
                        value = json.loads(out["text"])
                        ok = isinstance(value, dict) and (params["response_format"]["type"] == "json_object" or (
                            isinstance(value.get("author"), str) and isinstance(value.get("year"), int)))
                    except json.JSONDecodeError:
                        ok = False
                    # a row cut by max_new_tokens inside the JSON is unfinished, not wrong
                    verdict = "ok" if ok else "cut" if out["finish_reason"] == "length" else "BAD"
                    parsed += f"{verdict}/{out['finish_reason']} "
            if "logit_bias" in params:
                parsed = "no id 1: " + str(all(1 not in (o.get("logprobs") or {}).get("token_ids", [])
                                                and "<eos>" not in o["text"] for o in g["outputs"]))
            rows.append((str(dtype).removeprefix("torch."), name, f"{sum(same)}/{len(same)}",
                         f"{worst:.2e}" if scored else "-", "ok" if worst <= tol else "OVER", parsed.strip()))
        print(f"{dtype}: {time.monotonic() - t:.1f} s", flush=True)
    print(f"\n{'dtype':<9}{'request':<28}{'graphed==eager':>15}{'max |dlogprob|':>16}{'tol':>6}  json / bias")
    for r in rows:
        print(f"{r[0]:<9}{r[1]:<28}{r[2]:>15}{r[3]:>16}{r[4]:>6}  {r[5]}")


if __name__ == "__main__":
    main()
