"""The fast training path against the notebook's recipe on tiny-gemma: the same examples in each optimizer step,
the same label and attention masks (completion-only and assistant-only included), the same loss; packed bins
(worker/train/packing.py) and padded micro-batches alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from app.core.jobs import JobCreate, JobSpec
from app.core.settings import Settings
from tests.core.test_formats import CHAT_ROWS, PC_ROWS
from tests.train.test_recipe import Recorder
from worker.train.fast_path import FastSFTTrainer, compile_decoder_layers, label_tokens, split_batch
from worker.train.packing import IGNORE, PackedBin, PackedStep, PackingCollator
from worker.train.recipe import build_trainer


def _payload(rows: list[dict[str, Any]], base_model: str = "tiny-gemma", **hp: Any) -> JobSpec:
    body = JobCreate.model_validate({"base_model": "tiny-gemma", "dataset": {"rows": rows}, "hyperparameters": {
        "max_steps": 3, "batch_size": 1, "gradient_accumulation_steps": 4, "max_length": 96,
        "gradient_checkpointing": False, "seed": 11, "warmup_steps": 0, "learning_rate": 1e-3} | hp,
        "validation": {"fraction": 0}})
    return JobSpec.from_request(body, base_model, default_seed=0)


def _record(trainer: Any) -> list[dict[str, torch.Tensor]]:
    """Every batch compute_loss sees while training (micro-batches), as given."""
    seen: list[dict[str, torch.Tensor]] = []
    original = trainer.compute_loss

    def compute_loss(model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
        if model.training:
            seen.append({key: v.detach().clone() for key, v in inputs.items() if torch.is_tensor(v)})
        return original(model, inputs, *a, **k)

    trainer.compute_loss = compute_loss
    return seen


def _examples(batch: dict[str, torch.Tensor], tok: Any) -> list[tuple[str, str, tuple[int, ...]]]:
    """Each row unpadded: decoded input, decoded label-bearing tokens, and its labels (pads must be -100)."""
    out = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any(), "right padding: ones, then zeros"
        assert (labels[n:] == -100).all(), "pads carry label -100"
        out.append((tok.decode(ids[:n]), tok.decode(ids[:n][labels[:n] != -100]), tuple(labels[:n].tolist())))
    return out


def _unpacked(bins: list[PackedBin], tok: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Each example of the packed bins: decoded input and its next-token targets (-100: not scored)."""
    out = []
    for b in bins:
        for (ids, positions, segments, targets), real in zip(b.data.unbind(dim=1), b.row_tokens, strict=True):
            for seg in segments[:real].unique().tolist():
                at = (segments[:real] == seg).nonzero().flatten()
                assert positions[at].tolist() == list(range(len(at))), "positions restart at 0 for every example"
                assert targets[at[-1]] == IGNORE, "an example's last token scores nothing"
                out.append((tok.decode(ids[at]), tuple(targets[at[:-1]].tolist())))
            assert (targets[real:] == IGNORE).all()
    return out


def _padded_examples(batch: dict[str, torch.Tensor], tok: Any) -> list[tuple[str, tuple[int, ...]]]:
    """The notebook's rows in the same form: next-token targets are the labels shifted by one."""
    return [(text, labels[1:]) for text, _, labels in _examples(batch, tok)]


def _train(rows: list[dict[str, Any]], fast: bool, tmp: Path, budget: int, packing: bool = True,
           **hp: Any) -> tuple[Any, Recorder, Any]:
    settings = Settings(data_dir=tmp, device="cpu", train_fast_path=fast, train_token_budget=budget,
                        train_packing=packing)
    rec = Recorder()
    trainer, _, _, _ = build_trainer(_payload(rows, **hp), rec, settings, str(tmp / ("fast" if fast else "nb")))
    seen = _record(trainer)
    if fast:
        trainer.bins_seen = []
    trainer.train()
    return trainer, rec, seen


@pytest.mark.parametrize("kind", ["template", "prompt_completion", "messages"])
def test_fast_path_sees_the_same_examples_masks_and_loss_per_step(tmp_path: Path, quotes: list[dict[str, Any]],
                                                                   kind: str) -> None:
    rows = {"template": quotes[:24], "prompt_completion": PC_ROWS, "messages": CHAT_ROWS}[kind]
    nb, nb_rec, nb_seen = _train(rows, False, tmp_path, 0)
    fast, fast_rec, fast_seen = _train(rows, True, tmp_path, 64)  # a small budget: several bins a step
    assert isinstance(fast, FastSFTTrainer) and not isinstance(nb, FastSFTTrainer)
    assert nb_rec.steps == fast_rec.steps == [1, 2, 3]
    assert len(nb_seen) == 12 and fast.args.gradient_accumulation_steps == 1
    assert not fast_seen, "packed steps do not go through trl's padded compute_loss"
    assert len(fast.bins_seen) == 3 and max(fast.micro_batch_counts) > 1
    batch = next(iter(fast.get_train_dataloader()))  # packed on the host by the training DataLoader's collator
    assert list(batch) == ["packed"] and isinstance(batch["packed"], PackedStep)
    assert not isinstance(fast.data_collator, PackingCollator)  # evaluation batches stay unpacked
    tok = nb.processing_class
    for step in range(3):
        want = sorted(e for b in nb_seen[4 * step:4 * step + 4] for e in _padded_examples(b, tok))
        got = sorted(_unpacked(fast.bins_seen[step], tok))
        assert got == want, f"step {step + 1}: different examples or targets"
        for b in fast.bins_seen[step]:
            assert b.data[0].numel() <= 64 or b.shape[0] == 1  # the token budget held (or one long row)
    if kind != "template":  # completion-only / assistant-only: some tokens of every example carry no label
        assert all(-100 in targets for bins in fast.bins_seen for _, targets in _unpacked(bins, tok))
    # same examples, same per-token mean over the effective batch: the same losses, up to float order
    nb_loss = [p["loss"] for p in nb.state.log_history if "loss" in p]
    fast_loss = [p["loss"] for p in fast.state.log_history if "loss" in p]
    assert fast_loss == pytest.approx(nb_loss, rel=2e-3), (fast_loss, nb_loss)
    nb_tokens = [p["num_tokens"] for p in nb.state.log_history if "loss" in p]
    assert [p["num_tokens"] for p in fast.state.log_history if "loss" in p] == nb_tokens


def test_padded_micro_batches_see_the_same_examples_and_loss(tmp_path: Path, quotes: list[dict[str, Any]]) -> None:
    """``train_packing=False``: length-grouped padded micro-batches through trl's compute_loss."""
    nb, _, nb_seen = _train(quotes[:24], False, tmp_path, 0)
    fast, _, fast_seen = _train(quotes[:24], True, tmp_path, 40, packing=False)
    assert len(fast_seen) == sum(fast.micro_batch_counts) and max(fast.micro_batch_counts) > 1
    assert fast.bins_seen == []
    tok = nb.processing_class
    starts = [sum(fast.micro_batch_counts[:i]) for i in range(4)]
    for step in range(3):
        want = sorted(e for b in nb_seen[4 * step:4 * step + 4] for e in _examples(b, tok))
        got = sorted(e for b in fast_seen[starts[step]:starts[step + 1]] for e in _examples(b, tok))
        assert got == want, f"step {step + 1}: different examples or masks"
        for b in fast_seen[starts[step]:starts[step + 1]]:
            assert b["input_ids"].numel() <= 40 or b["input_ids"].shape[0] == 1  # the token budget held
    nb_loss = [p["loss"] for p in nb.state.log_history if "loss" in p]
    fast_loss = [p["loss"] for p in fast.state.log_history if "loss" in p]
    assert fast_loss == pytest.approx(nb_loss, rel=2e-3), (fast_loss, nb_loss)


@pytest.mark.parametrize(("packing", "model"), [(True, "tiny-gemma"), (False, "tiny-gemma"),
                                                (True, "gemma-3-270m")])
def test_fast_loss_and_gradients_equal_the_reference_on_one_batch(tmp_path: Path, quotes: list[dict[str, Any]],
                                                                   packing: bool, model: str) -> None:
    """Unquantized so the comparison is tight: the packed (or split) per-token-mean loss of the fast step equals
    the plain full-logits cross-entropy of the padded batch, and so do the LoRA gradients. Packed runs in float64:
    packing is exact, and in fp32 its different attention kernels alone move gemma-3-270m's gradients by about
    7e-5 (relative norm). gemma-3-270m mixes sliding-window and full attention layers (a mask per layer type)."""
    settings = Settings(data_dir=tmp_path, device="cpu", train_fast_path=True, train_token_budget=48,
                        train_packing=packing)
    payload = _payload(quotes[:16], base_model=model, quantization="none", batch_size=8, gradient_accumulation_steps=1)
    trainer, _, _, _ = build_trainer(payload, Recorder(), settings, str(tmp_path / "run"))
    model = trainer.model
    if packing:
        model.double()
    for p in model.parameters():  # LoRA B starts at zero; make every LoRA weight matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    assert len(split_batch(batch, 48)) > 1

    model.zero_grad()
    trainer.bins_seen = []
    fast_loss = trainer.training_step(model, dict(batch))
    assert len(trainer.bins_seen) == (1 if packing else 0) and trainer.micro_batch_counts[-1] > 1
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    wide = torch.promote_types(logits.dtype, torch.float32)
    labels = batch["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).to(wide),
                                            labels.reshape(-1), ignore_index=-100, reduction="sum")
    ref = ref / label_tokens(batch["labels"])
    ref.backward()
    tol = {"rtol": 1e-9, "atol": 1e-12} if packing else {"rtol": 1e-4, "atol": 1e-6}
    assert float(fast_loss) == pytest.approx(float(ref), rel=1e-9 if packing else 1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast_grads[n], p.grad, **tol)


def test_compiled_layers_run_in_training_only_and_fall_back_to_eager(tmp_path: Path, quotes: list[dict[str, Any]],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile_decoder_layers`` (GPU only in the trainer) with torch.compile stubbed: training forwards go through
    the compiled callable, evaluation and no-grad forwards do not, and a compiled call that raises leaves the
    layers eager with the same loss."""
    settings = Settings(data_dir=tmp_path, device="cpu", train_fast_path=True, train_compile_min_examples=1)
    trainer, _, _, _ = build_trainer(_payload(quotes[:16], batch_size=4, gradient_accumulation_steps=1),
                                     Recorder(), settings, str(tmp_path / "run"))
    model = trainer.model
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and not any("forward" in vars(m) for m in layers)  # the CPU never compiles
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    calls = {"compiled": 0, "fail": False}

    def fake_compile(fn: Any, **kwargs: Any) -> Any:
        assert kwargs.get("dynamic") is True

        def run(*args: Any, **kw: Any) -> Any:
            calls["compiled"] += 1
            if calls["fail"]:
                raise RuntimeError("compiler bug")
            return fn(*args, **kw)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    eager_loss = float(trainer.training_step(model, dict(batch)))
    assert compile_decoder_layers(model) == len(layers)
    model.train()
    assert float(trainer.training_step(model, dict(batch))) == pytest.approx(eager_loss, rel=1e-6)
    assert calls["compiled"] == len(layers)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert calls["compiled"] == len(layers)  # evaluation and no-grad forwards stay eager
    calls["fail"] = True
    assert float(trainer.training_step(model, dict(batch))) == pytest.approx(eager_loss, rel=1e-6)
    assert calls["compiled"] == len(layers) + 1  # one failed call, then eager for good


def test_fused_kernels_compute_what_transformers_and_peft_compute(tmp_path: Path,
                                                                   quotes: list[dict[str, Any]]) -> None:
    """worker/train/fused.py (the GPU fast path's; run here on the CPU in float64, where only rounding could differ):
    gemma-3-270m's logits with fused norms equal transformers' own; a LoRA model's loss and LoRA gradients with
    fused LoRA projections equal peft's; with the adapter disabled the fused layers defer to peft."""
    from transformers import AutoModelForCausalLM

    from worker.models import load_tokenizer
    from worker.train.fused import fuse_gemma_norms, fuse_lora_linears

    settings = Settings(device="cpu", data_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(settings.model_cache_dir / "gemma-3-270m", dtype=torch.float64)
    ids = load_tokenizer("gemma-3-270m", settings)(["Quote: Be yourself.\nAuthor:"], return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert fuse_gemma_norms(model) == 6 * model.config.num_hidden_layers + 1  # 4 a layer, q/k norms, final
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-10, atol=1e-10)

    payload = _payload(quotes[:8], quantization="none", batch_size=4, gradient_accumulation_steps=1,
                       lora={"r": 8, "alpha": 24})  # scaling 3: a scaling left out shows
    trainer, _, _, _ = build_trainer(payload, Recorder(), settings, str(tmp_path / "run"))
    lora = trainer.model.double()
    for p in lora.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        lora.zero_grad()
        loss = lora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora.parameters() if p.requires_grad]

    want_loss, want_grads = loss_and_grads()
    assert fuse_lora_linears(lora) == 7 * lora.config.num_hidden_layers
    unfused = []  # peft's forward calls lora_B as a module; the fused one uses its weight in the addmm
    for m in lora.modules():
        if type(m).__name__ == "Linear" and hasattr(m, "lora_B"):
            m.lora_B["default"].register_forward_pre_hook(lambda *_: unfused.append(1))
    got_loss, got_grads = loss_and_grads()  # in place on the base output (plain Linear bases here)
    assert not unfused  # every projection took the fused path
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-10, atol=0)
    for got, exp in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)
    with torch.no_grad(), lora.disable_adapter():
        base = lora(input_ids=batch["input_ids"]).logits
        lora.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(1.0)
        assert torch.equal(lora(input_ids=batch["input_ids"]).logits, base)  # the adapter is off: B unused


def test_a_failing_graph_capture_falls_back_to_eager_steps_with_the_same_loss(tmp_path: Path,
                                                                              quotes: list[dict[str, Any]]) -> None:
    """The trainer's side of a failed CUDA-graph capture (the capture itself needs a GPU): the bins already run
    keep their loss and gradients, the failing bin and every later step run eagerly, nothing is lost or doubled."""
    from worker.train.cuda_graphs import GraphedSteps
    from worker.train.fast_path import EagerSteps

    settings = Settings(data_dir=tmp_path, device="cpu", train_fast_path=True, train_token_budget=48)
    trainer, _, _, _ = build_trainer(_payload(quotes[:16], quantization="none", batch_size=8,
                                              gradient_accumulation_steps=1), Recorder(), settings,
                                     str(tmp_path / "run"))
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    model.zero_grad()
    want = float(trainer.training_step(model, dict(batch)))
    want_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    eager = trainer._runner
    assert isinstance(eager, EagerSteps)

    class FailsOnSecondBin(GraphedSteps):
        def __init__(self) -> None:  # no CUDA here: only what the trainer touches
            self.loss_fn, self.device, self.calls = eager.loss_fn, eager.device, 0
            self.inner = EagerSteps(eager.loss_fn, eager.device)

        def run(self, data: torch.Tensor, scale: float) -> None:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("operation not permitted when stream is capturing")
            self.inner.run(data, scale)

        def take_loss(self) -> torch.Tensor:
            return self.inner.take_loss()

    trainer._runner = FailsOnSecondBin()
    model.zero_grad()
    got = float(trainer.training_step(model, dict(batch)))
    assert trainer.micro_batch_counts[-1] > 2 and isinstance(trainer._runner, EagerSteps)
    assert got == pytest.approx(want, rel=1e-6)
    for p, g in zip([p for p in model.parameters() if p.requires_grad], want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
