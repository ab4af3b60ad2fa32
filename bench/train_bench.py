"""Training speed on one GPU, one process: the notebook's recipe beside the service's trainer, same data and model.

Model: the google/gemma-2b architecture with random weights (vocab 262,144, the Gemma 3 tokenizer; built and saved
as safetensors by ``common.build_model``), NF4 base, LoRA r=8 on the seven projections; data: the 651 quotes.
Every variant goes through ``worker.train.recipe.build_trainer`` (the hub id is pointed at the local folder only):

* ``notebook``        the notebook's recipe: batch 1 x accumulation 4, gradient checkpointing, paged 8-bit AdamW,
                      the old path (``train_fast_path=False``); fewer steps than its 100, for time.
* ``service-default`` the fast path with the job defaults (``app.core.jobs.Hyperparameters``), the default examples.
* ``steady``          the fast path at a large effective batch over several epochs: the throughput it sustains.
* ``steady-nf4``      ``steady`` without dequantising the NF4 base (bnb dequantises on every matmul).
* ``steady-ckpt``     ``steady`` with gradient checkpointing.
* ``steady-b2k``      ``steady`` with a 2,048-token budget instead of the one picked from free memory.
* ``steady-eager``    ``steady`` with eager attention instead of SDPA; ``steady-tf32``: TF32 matmuls allowed.
* ``steady-2``        ``steady`` again, warm (the first fast variant of a process pays the first-use warm-up).
* ``steady-sync``     ``steady`` with the host waiting for the GPU at the end of every step (as transformers' logging
                      made it before the fast path's deferred logs): what queueing the next step early is worth.
* ``steady-mlpc``     experiment: ``steady`` with GELU(gate) x up of each MLP through one ``torch.compile``'d function.
* ``steady-tN``       ``steady`` with a token budget of N set by hand (e.g. ``steady-t3840``).
* ``steady-nograph``  ``steady`` with the packed bins run eagerly (no CUDA graphs: ``train_cuda_graphs=False``).
* ``steady-unfused``  ``steady`` with transformers' RMSNorms and peft's LoRA forward (``train_fused_kernels=False``).
* ``steady-padded``   ``steady`` with padded, length-grouped micro-batches instead of packed bins (the T1-T4 path).
* ``steady-p1k``      ``steady`` with 1,024-token bins; ``-p2k``, ``-p3k``, ``-p4k``: 2,048, 3,072, 4,096.
* ``graph-check``     one step of 256 examples with random LoRA weights, through the graphs and eagerly: the
                      relative difference of the LoRA gradients and of the loss (not a throughput row).
* ``steady-compile``  ``steady`` with each decoder layer compiled (``train_compile_min_examples=1``); its first step
                      pays the compile (the "first step s" column).
* ``loss-check``      the LM-head loss kernel on one random bf16 bin against T6's formulation (not a throughput row).
* ``profile``         5 steps of ``steady`` with torch.profiler over steps 4-5 (top ops printed, ``profile.txt``).
* ``job``             a whole default job through ``worker.train.recipe.train`` (10 % validation, evals and samples
                      before/after, adapter saved): data, load, setup (the trainer's construction), eval (loss /
                      samples), train (first step) and save seconds apart. ``job-compile``: the same, compiled.

``--only`` runs the named variants in the order given (default: all, jobs last). ``--model-cache DIR`` builds the
model there once and reuses it in a later process (to time a job in a fresh process, as a worker runs each job).

MFU = tokens/s x 4 x params / 790e12 (bf16 dense rate of this H200 kind; recompute not counted), tokens = non-padding
input tokens (trl's ``num_tokens``). "steady tok/s" leaves out the first 2 steps (warm-up). Table last.
The first fast variant in a process also pays the warm-up of new shapes (RESULTS.md run T2): compare later rows.

Usage:
  python bench/train_bench.py --tiny          # CPU, tiny Gemma, a few steps: checks the script
  python bench/train_bench.py --out $OUT      # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import HUB_ID, build_model, load_quotes, log, patch_hub  # noqa: E402
from train_checks import check_dequant, check_graphs, check_loss_kernel  # noqa: E402
from train_runs import run_job, run_variant  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from app.core.jobs import JobCreate  # noqa: E402
from app.core.settings import Settings  # noqa: E402

T0 = time.monotonic()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny Gemma, a few steps")
    ap.add_argument("--src", default=str(ROOT / ".gpu"))
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--notebook-steps", type=int, default=25)
    ap.add_argument("--steady-batch", type=int, default=256, help="effective batch of the steady runs")
    ap.add_argument("--steady-epochs", type=float, default=4.0)
    ap.add_argument("--only", default="", help="comma-separated variants, run in this order (default: all)")
    ap.add_argument("--no-dequant-check", action="store_true", help="skip the NF4 dequantisation check")
    ap.add_argument("--model-cache", default="", help="build the model here once; reuse it when present")
    ap.add_argument("--deadline", type=float, default=0.0, help="start no variant after this many seconds")
    a = ap.parse_args()
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device; use --tiny")
        return 2
    import peft
    import transformers
    import trl
    log("versions: torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
        "trl", trl.__version__)
    src = Path(a.src)
    work = Path(tempfile.mkdtemp(prefix="ftaas-train-bench-"))
    model_dir = Path(a.model_cache) if a.model_cache else work / "gemma-2b"
    if (model_dir / "nparams.txt").is_file():
        nparams, build_s = int((model_dir / "nparams.txt").read_text()), 0.0
    else:
        nparams, build_s = build_model(src, model_dir, a.tiny, device)
        (model_dir / "nparams.txt").write_text(str(nparams))
    patch_hub(model_dir)
    rows = load_quotes(src)
    log(f"model {nparams / 1e9:.3f} B params built+saved in {build_s:.1f} s; {len(rows)} rows")

    defaults = JobCreate.model_validate({"dataset": {"rows": rows}}).hyperparameters.model_dump()
    fast = Settings(device=device, data_dir=work / "data", train_fast_path=True)
    tiny_budget = {"train_token_budget": 256} if a.tiny else {}
    steady_steps = max(3, int(a.steady_epochs * len(rows) / a.steady_batch))
    if a.tiny:
        a.notebook_steps, steady_steps, a.steady_batch = 3, 3, 16
    steady_hp = {"batch_size": a.steady_batch, "gradient_accumulation_steps": 1, "max_steps": steady_steps,
                 "gradient_checkpointing": False, "warmup_steps": 1}
    def eager(trainer: Any) -> None:
        trainer.model.get_base_model().set_attn_implementation("eager")

    class WaitEachStep(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()

    def wait_each_step(trainer: Any) -> None:
        trainer.add_callback(WaitEachStep())

    def compiled_mlp(trainer: Any) -> None:
        """Experiment: GELU(gate) x up of each MLP as one torch.compile'd function (forward and backward fused)."""
        gelu_mul = torch.compile(lambda g, u: torch.nn.functional.gelu(g, approximate="tanh") * u, dynamic=True)
        for m in trainer.model.modules():
            if type(m).__name__.endswith("MLP") and hasattr(m, "gate_proj"):
                m.forward = (lambda mlp: lambda x: mlp.down_proj(gelu_mul(mlp.gate_proj(x), mlp.up_proj(x))))(m)

    tweaks: dict[str, Any] = {"steady-eager": eager, "steady-sync": wait_each_step,
                              "steady-mlpc": compiled_mlp}
    plan: list[tuple[str, dict[str, Any], Settings]] = [
        ("notebook", {"batch_size": 1, "gradient_accumulation_steps": 4, "max_steps": a.notebook_steps,
                      "gradient_checkpointing": True, "learning_rate": 2e-4, "warmup_steps": 2},
         Settings(device=device, data_dir=work / "data", train_fast_path=False)),
        ("service-default", {"max_steps": 3} if a.tiny else {},
         Settings(device=device, data_dir=work / "data", **tiny_budget)),
        ("steady", steady_hp, Settings(device=device, data_dir=work / "data", **tiny_budget)),
        ("steady-2", steady_hp, Settings(device=device, data_dir=work / "data", **tiny_budget)),
        ("steady-sync", steady_hp, Settings(device=device, data_dir=work / "data", **tiny_budget)),
        ("steady-mlpc", steady_hp, Settings(device=device, data_dir=work / "data", **tiny_budget)),
        ("steady-nograph", steady_hp, Settings(device=device, data_dir=work / "data", train_cuda_graphs=False,
                                               **tiny_budget)),
        ("steady-unfused", steady_hp, Settings(device=device, data_dir=work / "data", train_fused_kernels=False,
                                               **tiny_budget)),
        ("steady-padded", steady_hp, Settings(device=device, data_dir=work / "data", train_packing=False,
                                              **tiny_budget)),
        ("steady-p1k", steady_hp, Settings(device=device, data_dir=work / "data", train_token_budget=1024)),
        ("steady-p2k", steady_hp, Settings(device=device, data_dir=work / "data", train_token_budget=2048)),
        ("steady-p3k", steady_hp, Settings(device=device, data_dir=work / "data", train_token_budget=3072)),
        ("steady-p4k", steady_hp, Settings(device=device, data_dir=work / "data", train_token_budget=4096)),
        ("steady-compile", steady_hp, Settings(device=device, data_dir=work / "data", train_compile_min_examples=1,
                                               **tiny_budget)),
        ("steady-nf4", steady_hp, Settings(device=device, data_dir=work / "data", train_dequantize=False,
                                           **tiny_budget)),
        ("steady-ckpt", steady_hp | {"gradient_checkpointing": True},
         Settings(device=device, data_dir=work / "data", **tiny_budget)),
        ("steady-b2k", steady_hp, Settings(device=device, data_dir=work / "data", train_token_budget=2048)),
        ("steady-eager", steady_hp, Settings(device=device, data_dir=work / "data", **tiny_budget)),
        ("steady-tf32", steady_hp, Settings(device=device, data_dir=work / "data", **tiny_budget)),
        ("profile", steady_hp | {"max_steps": 5}, Settings(device=device, data_dir=work / "data", **tiny_budget)),
    ]
    jobs_plan = {"job": fast, "job-compile": Settings(device=device, data_dir=work / "data",
                                                      train_compile_min_examples=1),
                 "job-nograph": Settings(device=device, data_dir=work / "data", train_cuda_graphs=False)}
    by_name = {name: (hp, settings) for name, hp, settings in plan}
    order = [n for n in a.only.split(",") if n] or [*by_name, *jobs_plan]
    results: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    errors: list[str] = []
    dequant_ok: bool | None = None
    graph_check: dict[str, Any] | None = None
    loss_check: dict[str, Any] | None = None
    if not a.no_dequant_check:
        try:
            dequant_ok = check_dequant(fast)
        except Exception as e:
            errors.append(f"dequant check: {type(e).__name__}: {e}")
            traceback.print_exc()
    for name in order:
        if a.deadline and time.monotonic() - T0 > a.deadline:
            errors.append(f"{name}: skipped (deadline)")
            continue
        try:
            if name == "loss-check":
                loss_check = check_loss_kernel()
                continue
            if name == "graph-check":
                graph_check = check_graphs(rows, steady_hp, Settings(device=device, data_dir=work / "data",
                                                                     **tiny_budget), work)
                continue
            if name in jobs_plan:
                job = run_job(rows if not a.tiny else rows[:60], jobs_plan[name], nparams,
                              {"max_steps": 2} if a.tiny else {}, name)
                jobs.append(job)
                log("RESULT", json.dumps(job, default=str))
                continue
            if name.startswith("steady-t") and name[8:].isdigit():  # steady with a token budget set by hand
                by_name[name] = (steady_hp, Settings(device=device, data_dir=work / "data",
                                                     train_token_budget=int(name[8:])))
            hp, settings = by_name[name]
            torch.backends.cuda.matmul.allow_tf32 = name == "steady-tf32"
            r = run_variant(name, rows, hp, settings, work, nparams, tweaks.get(name),
                            a.out if name == "profile" else None)
            results.append(r)
            log("RESULT", json.dumps(r, default=str))
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")
            traceback.print_exc()

    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "train_bench.json").write_text(json.dumps(
            {"results": results, "jobs": jobs, "errors": errors, "defaults": defaults, "dequant_ok": dequant_ok,
             "graph_check": graph_check, "loss_check": loss_check},
            indent=1, default=str))
    ref = next((r.get("tokens_per_s") for r in results if r["variant"] == "notebook"), None)
    log("\nTABLE")
    log(f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu (--tiny)'}; model "
        f"{'tiny Gemma' if a.tiny else HUB_ID + ' architecture'}, random weights, {nparams / 1e9:.3f} B params, "
        f"NF4; defaults: {json.dumps({k: defaults[k] for k in ('max_steps', 'batch_size', 'gradient_accumulation_steps', 'learning_rate', 'gradient_checkpointing')})}")  # noqa: E501
    log("| variant | steps x examples/step | token budget (micro-batches/step) | train s | first step s | graphs "
        "(capture s) | tokens/s | steady tok/s | samples/s | peak GiB | MFU | final loss | x notebook |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        per = r["examples"] // max(1, r["steps"])
        log(f"| {r['variant']} | {r['steps']} x {per} | {r['token_budget'] or '-'} ({r['micro_batches_per_step']:.1f}) "
            f"| {r['train_s']:.2f} | {_f(r.get('first_step_s'), 2)} | {r['graphs']} ({_f(r['capture_s'], 2)}) "
            f"| {_f(r.get('tokens_per_s'), 0)} "
            f"| {_f(r.get('steady_tokens_per_s'), 0)} "
            f"| {_f(r.get('samples_per_s'), 1)} | {_f(r['peak_gib'], 2)} | {_pct(r.get('mfu'))} "
            f"| {_f(r['final_loss'], 4)} | {_f(r.get('tokens_per_s', 0) / ref if ref else None, 1)} |")
    if jobs:
        log("\nwhole default job (worker.train.recipe.train: 10 % validation, eval before/after, periodic evals, "
            "samples, save; eval = outside train, of which samples):")
        log("| variant | total s | data s | load s | setup s | eval s (samples s) | train s (first step s) | save s "
            "| steps x examples | tokens/s (train s) | peak GiB | eval loss before / after | adapter saved |")
        log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for job in jobs:
            ev = job["eval"]
            log(f"| {job['variant']} | {job['total_s']:.2f} | {job.get('data_s', 0):.2f} | {job.get('load_s', 0):.2f} "
                f"| {job['setup_s']:.2f} | {job.get('eval_s', 0):.2f} ({job['samples_s']:.2f}) "
                f"| {job.get('train_s', 0):.2f} ({_f(job['first_step_s'], 2)}) | {job.get('save_s', 0):.2f} "
                f"| {job['steps']} x {job['examples'] // max(1, job['steps'])} | {_f(job.get('tokens_per_s'), 0)} "
                f"| {_f(job['peak_gib'], 2)} | {_f(ev.get('eval_loss_before'), 4)} / "
                f"{_f(ev.get('eval_loss_after'), 4)} | {'yes' if job['adapter_ok'] else 'NO'} |")
    log("check: dequantised NF4 weights equal bnb's dequantize_4bit:", dequant_ok)
    log("check: CUDA graphs vs eager, one step:", json.dumps(graph_check))
    if loss_check is not None:
        log("check: LM-head loss, bf16 probabilities vs fp32 then cast:", json.dumps(loss_check))
    log("errors:", "; ".join(errors) if errors else "none")
    return 1 if errors else 0


def _f(x: float | None, nd: int) -> str:
    return "n/a" if x is None else f"{x:,.{nd}f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


if __name__ == "__main__":
    sys.exit(main())
