"""Quality parity on the real gemma-3-270m (CPU is enough): held-out eval loss after the same examples.

Each variant trains a fresh NF4 + LoRA r=8 adapter through the service's ``build_trainer`` on the 651 quotes
(the trainer's default seeded 10 % validation split: 65 held out), sees the same number of training examples
(``--examples``, default 400: the notebook's 100 steps x 4), and reports the held-out eval loss before and after.
The trainer's random sampler draws the same permutation whatever the batch size, so every variant trains on the
same examples; only the grouping into optimizer steps, the learning rate and the code path differ.

Usage:
  python bench/quality_parity.py                       # all variants, table last
  python bench/quality_parity.py --only notebook,e16   # some of them
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from app.core.jobs import JobCreate, JobSpec  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from worker.train.recipe import build_trainer  # noqa: E402

#: name -> (batch_size, gradient_accumulation_steps, learning_rate, warmup_steps, fast path)
VARIANTS: dict[str, tuple[int, int, float, int, bool]] = {
    "notebook": (1, 4, 2e-4, 2, False),
    "service-default": (1, 4, 2e-4, 2, True),  # the notebook's hyperparameters through the fast path
    "e16-lr4e-4": (16, 1, 4e-4, 1, False),
    "e16-lr8e-4": (16, 1, 8e-4, 1, False),
    "e40-lr1e-3": (40, 1, 1e-3, 1, False),
    "e16-lr8e-4-fast": (16, 1, 8e-4, 1, True),
}


class _Quiet:
    def progress(self, *a: Any, **k: Any) -> None: ...
    def evaluated(self, *a: Any, **k: Any) -> None: ...
    def event(self, *a: Any, **k: Any) -> None: ...
    def phase(self, *a: Any, **k: Any) -> None: ...
    def should_stop(self) -> bool:
        return False


def run(name: str, spec: tuple[int, int, float, int, bool], rows: list[dict[str, Any]], examples: int,
        model: str, seed: int, max_length: int, quantization: str) -> dict[str, Any]:
    bs, ga, lr, warmup, fast = spec
    steps = examples // (bs * ga)
    body = JobCreate.model_validate({"base_model": model, "dataset": {"rows": rows}, "hyperparameters": {
        "max_steps": steps, "batch_size": bs, "gradient_accumulation_steps": ga, "learning_rate": lr,
        "warmup_steps": warmup, "max_length": max_length, "gradient_checkpointing": False, "seed": seed,
        "quantization": quantization,
        "eval_interval": 10_000}})
    payload = JobSpec.from_request(body, model, default_seed=seed)
    settings = Settings(device="cpu", train_fast_path=fast)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as out:
        trainer, _, callback, _ = build_trainer(payload, _Quiet(), settings, out)
        # One example per eval batch for every variant: the Trainer's eval loss is a per-batch token mean
        # averaged over examples, so it moves with the eval batch size (64 on the fast path, 8 otherwise).
        trainer.args.per_device_eval_batch_size = 1
        before = trainer.evaluate()["eval_loss"]
        t = time.monotonic()
        trainer.train()
        train_s = time.monotonic() - t
        after = trainer.evaluate()["eval_loss"]
    return {"variant": name, "batch": f"{bs} x {ga}", "steps": steps, "examples": steps * bs * ga, "lr": lr,
            "fast": fast, "eval_before": before, "eval_after": after, "train_s": train_s,
            "final_loss": callback.losses[-1] if callback.losses else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--quantization", default="nf4", choices=["nf4", "none"],
                    help="none: the fp32 base (the hyperparameter question is the same; much faster on a CPU)")
    ap.add_argument("--quotes", default=str(ROOT / ".gpu" / "quotes.jsonl"))
    ap.add_argument("--json", default="", help="append each result as a JSON line here")
    a = ap.parse_args()
    rows = [json.loads(line) for line in Path(a.quotes).read_text().splitlines() if line.strip()]
    names = [n for n in a.only.split(",") if n] or list(VARIANTS)
    results = []
    for name in names:
        r = run(name, VARIANTS[name], rows, a.examples, a.model, a.seed, a.max_length, a.quantization)
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
        results.append(r)
    ref = next((r["eval_after"] for r in results if r["variant"] == "notebook"), None)
    print("| variant | batch | steps | examples | lr | eval loss before | eval loss after | vs notebook | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rel = f"{(r['eval_after'] / ref - 1) * 100:+.2f} %" if ref else "n/a"
        print(f"| {r['variant']} | {r['batch']} | {r['steps']} | {r['examples']} | {r['lr']:g} | "
              f"{r['eval_before']:.4f} | {r['eval_after']:.4f} | {rel} | {r['train_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
