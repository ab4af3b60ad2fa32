"""GPU smoke benchmark: the service's own trainer and inference engine on the google/gemma-2b architecture.

One process: build google/gemma-2b with random weights (vocab 262,144 for the Gemma 3 tokenizer), train the
job defaults with ``worker.train.recipe.train`` (NF4, LoRA r=8 on all seven projections, batch 1 x accumulation 4,
100 steps, gradient checkpointing) on the 651 quotes, then generate with ``worker.serve.pool.EnginePool`` with and
without the adapter. Prints a table last.

The trainer holds out a validation split by default (10 % of the 651 rows: 65), measures eval loss before, every
max_steps/5 steps inside ``trainer.train()`` and after, and samples 3 prompts before and after; the table shows
those, the time of the evals inside and outside ``trainer.train()``, and trl's own training-token count.

Inputs (copy them into the ignored ``.gpu/`` folder, which the GPU call carries):
  .gpu/gemma-2b-config.json   from ../shared/gemma-2b-config.json
  .gpu/tokenizer.json.gz      from ../shared/gpu/data/ (the Gemma 3 tokenizer)
  .gpu/tokenizer_config.json  from ../shared/gpu/data/
  .gpu/quotes.jsonl           from ../shared/gpu/data/

Usage:
  python bench/gpu_smoke.py --tiny            # CPU, tiny Gemma, 3 steps: checks the script in seconds
  python bench/gpu_smoke.py --out $OUT        # GPU: the real figures (see bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import HUB_ID, RecordingReporter, build_model, load_quotes, log, patch_hub  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import worker.train.recipe  # noqa: E402
from app.api.schemas import GenerateRequest, JobCreate  # noqa: E402
from app.core.ids import new_id  # noqa: E402
from app.core.jobs import GenerateTask, JobSpec  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from worker.serve.pool import EnginePool  # noqa: E402

PROMPTS = [
    "Quote: Imagination is more",
    "Quote: The only way to do great",
    "Quote: In the middle of difficulty",
    "Quote: Life is what happens",
    "Quote: Be yourself; everyone else",
    "Quote: It always seems impossible",
    "Quote: Stay hungry,",
    "Quote: The best time to plant a tree",
]


def count_tokens_fed() -> dict[str, int]:
    """Counts the input ids that reach the embedding of the model the trainer loads (a forward pre-hook).

    A cross-check only: trl's ``num_tokens`` (the reporter's ``tokens_seen``) is the training count. The hook
    sees every forward: training, trl's evaluations and the before/after sample generation. It keeps the
    training-mode forwards apart (the trainer switches the model to eval mode to evaluate and to sample).
    With batch 1 nothing is padded in training, so that part is the non-padding token count.
    """
    counter = {"tokens": 0, "calls": 0, "train_tokens": 0, "train_calls": 0, "active": 1}
    original = worker.train.recipe.load_model

    def load_model(*args: Any, **kwargs: Any) -> Any:
        model = original(*args, **kwargs)

        def hook(module: Any, inputs: tuple[Any, ...]) -> None:
            if counter["active"] and inputs and torch.is_tensor(inputs[0]):
                counter["tokens"] += int(inputs[0].numel())
                counter["calls"] += 1
                if module.training:
                    counter["train_tokens"] += int(inputs[0].numel())
                    counter["train_calls"] += 1

        model.get_input_embeddings().register_forward_pre_hook(hook)
        return model

    worker.train.recipe.load_model = load_model
    return counter


def gen_request(prompts: list[str], adapter: str | None, base_model: str, max_new_tokens: int) -> dict[str, Any]:
    """What the generate task hands the engine (app/api/services/generate.py builds the task the same way)."""
    body = GenerateRequest(prompts=prompts, adapter=adapter, max_new_tokens=max_new_tokens, do_sample=False)
    task = GenerateTask.model_validate(body.model_dump(exclude={"prompt", "prompts"}) | {
        "prompts": body.prompt_list, "base_model": base_model, "quantization": "nf4",
        "gen_id": new_id("gen"), "enqueued_at": time.time()})
    return task.engine_request()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny Gemma, 3 steps")
    ap.add_argument("--src", default=str(ROOT / ".gpu"), help="folder with the config, tokenizer and quotes")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="where results.json goes (optional)")
    ap.add_argument("--work", default=None, help="scratch folder for the model and adapters (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=None, help="override max_steps (default: the job default, 100)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--validation-fraction", type=float, default=None,
                    help="override the job's validation split (0 = none, as before evaluation existed)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate runs per combination, after a warm-up")
    a = ap.parse_args()

    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device; use --tiny on the CPU")
        return 2
    src = Path(a.src)
    work = Path(a.work or tempfile.mkdtemp(prefix="ftaas-gpu-smoke-"))
    model_dir, data_dir = work / "gemma-2b", work / "data"

    import peft
    import transformers
    import trl
    log("versions: torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
        "trl", trl.__version__, "python", sys.version.split()[0])
    if device == "cuda":
        import bitsandbytes
        log("bitsandbytes", bitsandbytes.__version__, "device", torch.cuda.get_device_name(0))

    row: dict[str, Any] = {}
    errors: list[str] = []

    # 1. the model: google/gemma-2b architecture, random weights, bf16, saved with the Gemma 3 tokenizer
    nparams, build_s = build_model(src, model_dir, a.tiny, device)
    log(f"built {'tiny Gemma' if a.tiny else HUB_ID} with random weights: {nparams / 1e9:.3f} B params, "
        f"built and saved in {build_s:.1f} s to {model_dir}")
    row["params"] = nparams
    row["build_save_s"] = build_s
    patch_hub(model_dir)
    fed = count_tokens_fed()

    # 2. the service's trainer on the job defaults
    rows = load_quotes(src)
    overrides: dict[str, Any] = {"seed": 42}  # the API picks one when absent; fixed here to be repeatable
    if a.tiny:
        overrides["max_steps"] = 3
    if a.steps:
        overrides["max_steps"] = a.steps
    body: dict[str, Any] = {"base_model": HUB_ID, "dataset": {"rows": rows}, "hyperparameters": overrides}
    if a.validation_fraction is not None:
        body["validation"] = {"fraction": a.validation_fraction}
    job = JobCreate.model_validate(body)
    payload = JobSpec.from_request(job, HUB_ID, default_seed=42)  # as app/api/services/jobs.py builds it
    hp = payload.hyperparameters.model_dump()
    log("hyperparameters:", json.dumps(hp))
    settings = Settings(device=device, data_dir=data_dir)
    job_id = "job_" + uuid.uuid4().hex[:22]
    out_dir = settings.adapter_dir / job_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [job.template.format_map(r) for r in rows]
    lens = [len(tok(t)["input_ids"]) for t in texts]
    row["mean_example_tokens"] = statistics.mean(lens)
    log(f"data: {len(rows)} rows, mean {statistics.mean(lens):.1f} tokens (tokenizer, with BOS), max {max(lens)}")

    reporter = RecordingReporter()
    evaluation: dict[str, Any] = {}
    trained = False
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        outcome = worker.train.recipe.train(payload, out_dir, reporter, settings)
        trained = not outcome.cancelled and (out_dir / "adapter_config.json").is_file()
        row |= {f"{k}_s": v for k, v in outcome.seconds.items()}
        row["steps"] = outcome.steps
        row["losses"] = outcome.losses
        evaluation = outcome.evaluation
        log("train outcome:", json.dumps({"cancelled": outcome.cancelled, "steps": outcome.steps,
                                          "seconds": {k: round(v, 2) for k, v in outcome.seconds.items()},
                                          "evaluation": {k: v for k, v in evaluation.items() if k != "samples"}}))
        for smp in evaluation.get("samples", []):
            log(f"  sample {smp['prompt']!r}: before {smp['before'][:100]!r} after {smp['after'][:100]!r}")
    except Exception as e:
        errors.append(f"train: {type(e).__name__}: {e}")
        log("TRAIN FAILED")
        traceback.print_exc()
        sys.stdout.flush()
    fed["active"] = 0
    if device == "cuda":
        row["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    examples = hp["max_steps"] * hp["batch_size"] * hp["gradient_accumulation_steps"]
    row["examples"] = examples
    row["tokens_seen_trl"] = reporter.tokens_seen()
    row["hook_train_tokens"] = fed["train_tokens"]
    row["hook_train_calls"] = fed["train_calls"]
    row["hook_all_tokens"] = fed["tokens"]
    row["hook_all_calls"] = fed["calls"]
    row["evaluation"] = evaluation
    row["eval_points"] = reporter.evals
    row["in_training_eval_s"] = sum(reporter.eval_gaps.values())
    row["dataset_stats"] = reporter.event_data("dataset_stats")
    steps_s = reporter.step_seconds()
    steps_s_plain = reporter.step_seconds(without_evals=True)
    if steps_s_plain:
        row["step_s_median"] = statistics.median(steps_s_plain)
        row["step_s_first_reported_gap"] = steps_s[0]
    if trained:
        row["adapter_files"] = sorted(p.name for p in out_dir.iterdir())
        row["adapter_mib"] = sum(p.stat().st_size for p in out_dir.iterdir()) / 2**20
        log("adapter:", out_dir, row["adapter_files"], f"{row['adapter_mib']:.1f} MiB")
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # 3. the service's engine: base and adapter, batch 1 and 8, greedy; per combination one warm-up, then
    # --repeats timed runs (median reported). The plain base is measured first on one engine and again last on a
    # second, fresh engine, so an order effect (warm-up, clocks, neighbours) shows up as a difference between them.
    engine = EnginePool(settings)
    gen: dict[str, dict[str, Any]] = {}
    texts_seen: dict[str, list[str]] = {}
    plan: list[tuple[str, str | None, int]] = [("base", None, 1), ("base", None, 8)]
    if trained:
        plan += [("adapter", job_id, 1), ("adapter", job_id, 8), ("base+loaded", None, 1), ("base+loaded", None, 8)]
    plan += [("base-last", None, 1), ("base-last", None, 8)]
    for label, adapter, bs in plan:
        key = f"{label}_b{bs}"
        try:
            if label == "base-last" and bs == 1:
                del engine
                gc.collect()
                engine = EnginePool(settings)
            t = time.monotonic()
            warm = engine.generate(gen_request(PROMPTS[:bs], adapter, HUB_ID, 8))
            sync()
            warm_s = time.monotonic() - t
            runs = []
            for _ in range(a.repeats):
                t = time.monotonic()
                res = engine.generate(gen_request(PROMPTS[:bs], adapter, HUB_ID, a.new_tokens))
                sync()
                ntok = sum(o["tokens"] for o in res["outputs"])
                runs.append({"wall_s": time.monotonic() - t, "generate_ms": res["timing"]["generate_ms"],
                             "tokens": ntok, "tokens_per_s": ntok / (res["timing"]["generate_ms"] / 1000)})
            tps = [r["tokens_per_s"] for r in runs]
            mid = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
            gen[key] = {"warmup_s": warm_s, "warmup_load_ms": warm["timing"]["load_ms"],
                        "tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps),
                        "tokens_per_s_max": max(tps), "tokens": mid["tokens"], "generate_ms": mid["generate_ms"],
                        "runs": runs, "finish": [o["finish_reason"] for o in res["outputs"]]}
            texts_seen[key] = [o["text"] for o in res["outputs"]]
            shown = json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in gen[key].items()
                                if k != "runs"})
            log(f"generate {key}: {shown} runs tok/s {[round(x, 1) for x in tps]}")
            log(f"  first output: {res['outputs'][0]['text'][:120]!r}")
        except Exception as e:
            errors.append(f"generate {key}: {type(e).__name__}: {e}")
            log(f"GENERATE FAILED {key}")
            traceback.print_exc()
            sys.stdout.flush()
    if device == "cuda":
        row["generate_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    checks = {}
    for bs in (1, 8):
        b, ad, bl = (texts_seen.get(f"{x}_b{bs}") for x in ("base", "adapter", "base+loaded"))
        if b is not None and bl is not None:
            checks[f"base output unchanged with the adapter loaded but disabled (b{bs})"] = b == bl
        if b is not None and ad is not None:
            checks[f"adapter output differs from base (b{bs})"] = b != ad
        last = texts_seen.get(f"base-last_b{bs}")
        if b is not None and last is not None:
            checks[f"base output the same on a fresh engine measured last (b{bs})"] = b == last
    for k, v in checks.items():
        log(f"check: {k}: {v}")

    # 4. the table, last
    tr_s = row.get("train_s")
    ev_in = row["in_training_eval_s"]
    seen = row["tokens_seen_trl"]
    samples = evaluation.get("samples") or []
    losses = row.get("losses") or []
    table = [
        ("device", torch.cuda.get_device_name(0) if device == "cuda" else "cpu (--tiny)"),
        ("model", f"{'tiny Gemma' if a.tiny else HUB_ID + ' architecture'}, random weights, "
                  f"{nparams / 1e9:.3f} B params, NF4 (bf16 compute)"),
        ("build + save random model s (setup, not the service)", f"{build_s:.1f}"),
        ("data s (trainer: prepare rows + split, tokenizer load, token stats)", _f(row.get("data_s"), 2)),
        ("model load s (trainer: NF4 load)", _f(row.get("load_s"), 1)),
        ("eval s (outside trainer.train(): eval loss before + after, samples before + after)",
         _f(row.get("eval_s"), 1)),
        ("train s (trainer.train(); now includes trl's periodic evals inside it)", _f(tr_s, 1)),
        ("train s: of which periodic evals inside trainer.train() (step log to its eval_loss)",
         f"{_f(ev_in, 1)} ({len(reporter.eval_gaps)} evals)"),
        ("train s without those evals (comparable with runs 1-2)", _f(tr_s - ev_in if tr_s is not None else None, 1)),
        ("save s (adapter + tokenizer)", _f(row.get("save_s"), 2)),
        ("steps", f"{row.get('steps', 'n/a')} (batch {hp['batch_size']} x accumulation "
                  f"{hp['gradient_accumulation_steps']} = {examples} examples)"),
        ("step s median (min-max), steps without an eval",
         f"{_f(row.get('step_s_median'), 3)} ({_f(min(steps_s_plain) if steps_s_plain else None, 3)}-"
         f"{_f(max(steps_s_plain) if steps_s_plain else None, 3)})"),
        ("training tokens (trl num_tokens, last tokens_seen)", f"{seen:,}" if seen is not None else "n/a"),
        ("cross-check: embedding hook, training-mode forwards (non-padding at batch 1)",
         f"{fed['train_tokens']:,} in {fed['train_calls']} micro-batches"),
        ("embedding hook, all forwards (training + evals + sample generation; not a training count)",
         f"{fed['tokens']:,} in {fed['calls']} forwards"),
        ("tokens/s (train: trl tokens / train s)", _f(seen / tr_s if tr_s and seen else None, 1)),
        ("tokens/s (train: trl tokens / train s without evals)",
         _f(seen / (tr_s - ev_in) if tr_s and seen else None, 1)),
        ("samples/s (train: examples / train s)", _f(examples / tr_s if tr_s else None, 2)),
        ("samples/s (train: examples / train s without evals)", _f(examples / (tr_s - ev_in) if tr_s else None, 2)),
        ("dataset_stats", _dataset_stats(row.get("dataset_stats"))),
        ("eval_loss before / after / relative change",
         f"{_f(evaluation.get('eval_loss_before'), 4)} / {_f(evaluation.get('eval_loss_after'), 4)} / "
         f"{_f(evaluation.get('relative_change'), 4)}"),
        ("eval points (step: eval_loss; before, inside and after training)",
         ", ".join(f"{p.get('step')}: {p['eval_loss']:.4f}" for p in reporter.evals if "eval_loss" in p) or "none"),
        ("samples (before/after)", f"{len(samples)} prompts"),
        ("sample 1", _sample(samples[0]) if samples else "n/a"),
        ("peak GPU memory, training (max_memory_allocated; incl. evals at batch 8 and samples)",
         _gib(row.get("train_peak_gib"))),
        ("peak GPU memory, generation", _gib(row.get("generate_peak_gib"))),
        ("loss first / last", f"{_f(losses[0] if losses else None, 4)} / {_f(losses[-1] if losses else None, 4)}"),
    ]
    for label in ("base", "base-last", "adapter", "base+loaded"):
        for bs in (1, 8):
            g = gen.get(f"{label}_b{bs}")
            if g is None:
                continue
            name = {"base": "base (measured first)", "base-last": "base (fresh engine, measured last)",
                    "adapter": "adapter", "base+loaded": "base, adapter loaded but disabled"}[label]
            table.append((f"generate tokens/s, {name}, batch {bs} (greedy {a.new_tokens} new)",
                          f"{g['tokens_per_s']:.1f} (median of {a.repeats}; range {g['tokens_per_s_min']:.1f}-"
                          f"{g['tokens_per_s_max']:.1f}; {g['tokens']} tokens in {g['generate_ms'] / 1000:.2f} s)"))
    for k, v in checks.items():
        table.append((f"check: {k}", "yes" if v else "NO"))
    table.append(("errors", "; ".join(errors) if errors else "none"))

    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "results.json").write_text(json.dumps(
            {"row": row, "generate": gen, "checks": checks, "errors": errors, "texts": texts_seen,
             "step_seconds": steps_s, "hyperparameters": hp, "progress_points": reporter.points,
             "eval_points": reporter.evals, "in_training_eval_gaps": reporter.eval_gaps,
             "events": reporter.events}, indent=1, default=str))
    log("\nTABLE")
    log("| metric | value |")
    log("|---|---|")
    for k, v in table:
        log(f"| {k} | {v} |")
    return 1 if errors else 0


def _f(x: float | None, nd: int) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _cell(text: str, n: int) -> str:
    """A shortened text for one markdown table cell (quoted, escapes shown, no pipes)."""
    short = text[:n] + ("..." if len(text) > n else "")
    return json.dumps(short, ensure_ascii=True).replace("|", "\\|")


def _sample(smp: dict[str, Any]) -> str:
    return f"prompt {_cell(smp['prompt'], 40)}; before {_cell(smp['before'], 60)}; after {_cell(smp['after'], 60)}"


def _dataset_stats(st: dict[str, Any] | None) -> str:
    if not st:
        return "n/a"
    tk = st.get("tokens") or {}
    return (f"format {st.get('format')}; rows {st.get('rows_used')} used of {st.get('rows_total')} "
            f"(dropped {st.get('rows_dropped') or 0}): train {st.get('train_rows')}, validation "
            f"{st.get('validation_rows')}; epochs {st.get('epochs')}; train tokens mean {tk.get('mean')} / "
            f"p95 {tk.get('p95')} / max {tk.get('max')} (over max_length {tk.get('over_max_length')})")


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} GiB"


if __name__ == "__main__":
    sys.exit(main())
