"""worker/train/packed_loss.py: the LM-head loss of the packed fast path, on the CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker.train.packing import IGNORE


def test_lm_head_loss_in_bf16_reads_the_loss_from_bf16_probabilities_within_their_rounding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """worker/train/packed_loss.py for a bf16 model: the softmax writes bf16 probabilities, so each token's loss is at
    most bf16's rounding (0.4 %) off the fp32 cross-entropy of the same bf16 logits; the gradient is the one
    from fp32 probabilities rounded once to bf16 (what the path computed before, through a separate cast)."""
    from worker.train.packed_loss import lm_head_loss

    torch.manual_seed(0)
    hidden = torch.randn(300, 64).bfloat16().requires_grad_()
    weight = torch.randn(1000, 64).bfloat16()
    targets = torch.randint(0, 1000, (300,))
    targets[::7] = IGNORE
    scale = torch.tensor(1 / 300, dtype=torch.float64)
    softmax, autocast_seen = torch.softmax, []

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return softmax(*args, **kwargs)

    monkeypatch.setattr(torch, "softmax", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on the GPU, where autocast runs softmax in fp32
        loss = lm_head_loss(hidden, weight, targets, scale, chunk=128)
    assert autocast_seen == [False] * 3  # the loss turns autocast off: its softmax writes bf16
    loss.backward()
    got = float(loss.detach())

    logits = hidden.detach() @ weight.t()
    scored = targets != IGNORE
    nll = torch.nn.functional.cross_entropy(logits.float(), torch.where(scored, targets, 0), reduction="none")
    want_loss = float((nll * scored).sum() / 300)
    assert got == pytest.approx(want_loss, abs=0.004) and got != want_loss  # from bf16 probabilities, not fp32's
    dlogits = torch.softmax(logits, dim=-1, dtype=torch.float32).bfloat16()
    dlogits[torch.arange(300), torch.where(scored, targets, 0)] -= 1
    want = (dlogits @ weight).float() * (scored.double() / 300).unsqueeze(1)
    assert hidden.grad is not None
    torch.testing.assert_close(hidden.grad, want.bfloat16(), rtol=0, atol=0)
