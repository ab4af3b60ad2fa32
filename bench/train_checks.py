"""The checks ``bench/train_bench.py`` runs beside its throughput rows: CUDA graphs against eager steps
(``check_graphs``), the LM-head loss kernel against T6's formulation (``check_loss_kernel``) and the fast path's
dequantised NF4 weights against bnb's own (``check_dequant``).

Imported as ``train_checks`` from the scripts in bench/ (bench/ and the repository root are on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from common import HUB_ID, RecordingReporter, log
from train_runs import free_gpu, payload_for

import worker.train.recipe
from app.core.settings import Settings


def check_graphs(rows: list[dict[str, Any]], hp: dict[str, Any], settings: Settings, work: Path) -> dict[str, Any]:
    """One training step of the same batch through the captured graphs and through the eager packed path."""
    from worker.train.fast_path import EagerSteps

    free_gpu()
    trainer, *_ = worker.train.recipe.build_trainer(payload_for(rows, hp, 0.0), RecordingReporter(), settings,
                                               str(work / "graph-check"))
    model = trainer.model
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # LoRA B starts at zero (and then A gets no gradient): make every LoRA weight matter
        torch.nn.init.normal_(p, std=0.02)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(hp["batch_size"])])
    out: dict[str, Any] = {}
    import worker.train.packed_loss as packed_loss

    loss_fn = packed_loss.lm_head_loss

    def seen_dtypes(hidden: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:  # what the LM-head loss gets
        out["lm_head_dtypes"] = [str(hidden.dtype), str(weight.dtype), str((hidden[:1] @ weight[:8].t()).dtype)]
        return loss_fn(hidden, weight, *args, **kwargs)

    packed_loss.lm_head_loss = seen_dtypes  # type: ignore[assignment]
    grads = []
    for runner in ("graphs", "eager", "eager-again"):
        model.zero_grad()
        if runner == "eager":
            trainer._runner = EagerSteps(trainer._runner.loss_fn, trainer._runner.device)
        loss = float(trainer.training_step(model, dict(batch)))
        if runner == "graphs":  # replay once more: a replay of a captured graph, not only the capture's warm-up
            model.zero_grad()
            loss = float(trainer.training_step(model, dict(batch)))
            out["graphs"] = len(getattr(trainer._runner, "graphs", {}))
        out[f"loss_{runner}"] = loss
        grads.append(torch.cat([p.grad.float().flatten() for p in params]))
    packed_loss.lm_head_loss = loss_fn
    out["grad_rel_diff"] = float((grads[0] - grads[1]).norm() / grads[1].norm())
    out["grad_rel_diff_eager_twice"] = float((grads[2] - grads[1]).norm() / grads[1].norm())  # run-to-run noise
    out["loss_rel_diff"] = abs(out["loss_graphs"] - out["loss_eager"]) / abs(out["loss_eager"])
    log(f"graph check: {json.dumps(out)}")
    del trainer, model
    return out


def check_loss_kernel() -> dict[str, Any]:
    """The LM-head loss of a bf16 bin (3,072 x 2,048 hidden, a 262,144-token head) against T6's formulation
    (fp32 probabilities, then a cast): the hidden-state gradients should be bitwise equal, the loss close."""
    from worker.train.packed_loss import LOSS_CHUNK, lm_head_loss

    free_gpu()
    torch.manual_seed(0)
    hidden = (torch.randn(3072, 2048, device="cuda") * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(262_144, 2048, device="cuda") * 0.05).bfloat16()
    targets = torch.randint(0, 262_144, (3072,), device="cuda")
    targets[::5] = -100
    scale = torch.tensor(1 / 3072, dtype=torch.float64, device="cuda")
    loss = lm_head_loss(hidden, weight, targets, scale)
    loss.backward()
    want_loss = torch.zeros((), dtype=torch.float64, device="cuda")
    want = torch.empty_like(hidden)
    scored = targets != -100
    safe = torch.where(scored, targets, 0).unsqueeze(1)
    with torch.no_grad():
        for s in range(0, 3072, LOSS_CHUNK):
            probs = torch.softmax(hidden[s:s + LOSS_CHUNK] @ weight.t(), dim=-1, dtype=torch.float32)
            want_loss += (-probs.gather(1, safe[s:s + LOSS_CHUNK]).log().squeeze(1) * scored[s:s + LOSS_CHUNK]).sum()
            d = probs.to(torch.bfloat16)
            d.scatter_add_(1, safe[s:s + LOSS_CHUNK], torch.full_like(safe[s:s + LOSS_CHUNK], -1, dtype=d.dtype))
            want[s:s + LOSS_CHUNK] = (d @ weight).float() * (scored[s:s + LOSS_CHUNK] * scale).unsqueeze(1)
    assert hidden.grad is not None
    out = {"grad_equal": bool(torch.equal(hidden.grad, want)),
           "grad_max_abs_diff": float((hidden.grad.float() - want.float()).abs().max()),
           "loss": float(loss.detach()), "loss_fp32_probs": float(want_loss * scale),
           "loss_rel_diff": abs(float(loss.detach()) - float(want_loss * scale)) / float(want_loss * scale)}
    log(f"loss check: {json.dumps(out)}")
    del hidden, weight, want
    free_gpu()
    return out


def check_dequant(settings: Settings) -> bool:
    """The fast path's dequantised weights equal bnb's own dequantisation of the NF4 weights, bit for bit."""
    import bitsandbytes as bnb

    from worker.models import compute_dtype, load_model
    from worker.nf4 import dequantize_nf4

    model = load_model(HUB_ID, "nf4", settings)
    names = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    picked = names[:: max(1, len(names) // 8)]
    mods = dict(model.named_modules())
    dtype = compute_dtype(settings.device)
    refs = {n: bnb.functional.dequantize_4bit(mods[n].weight.data, mods[n].weight.quant_state).to(dtype)
            for n in picked}
    model = dequantize_nf4(model, dtype)
    mods = dict(model.named_modules())
    ok = all(torch.equal(mods[n].weight, refs[n]) for n in picked)
    log(f"dequant check: {len(picked)} of {len(names)} NF4 layers compared, equal: {ok}")
    del model, mods, refs
    free_gpu()
    return ok

