"""Forward and loss of one packed bin (worker/train/packing.py) through a causal LM whose LM head is frozen (LoRA).

The loss is the sum of next-token cross-entropies times ``scale`` (1 / the step's scored tokens: trl's per-token
mean under gradient accumulation). The LM head runs over the bin in chunks and the gradient of the loss with
respect to the hidden states is computed in the same pass (``_LMHeadLoss``): the 256k-vocabulary logits of a chunk
live only inside the forward, nothing of them is kept for backward, and nothing is recomputed. With a frozen head
(tied embeddings, not a LoRA target) that gradient is all backward needs. Every shape is fixed by the bin's
capacity and nothing reads a value back to the host, so the whole forward and backward can be captured as a CUDA
graph (worker/train/cuda_graphs.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from worker.train.packing import IGNORE, attention_masks

LOSS_CHUNK = 1024


class _LMHeadLoss(torch.autograd.Function):
    """sum over scored rows of -log softmax(logits)[target] x scale, logits = softcap(hidden @ W^T).

    Per chunk: the logits in the model's dtype, one softmax kernel that reads them and writes the probabilities in
    the model's dtype (computed in fp32, rounded once: what T6 got by writing fp32 and casting, in a third of the
    bytes; RESULTS.md run T7), the loss from the target's probability, 1 taken off at the target (the gradient of
    the logits, up to the row's scale), one matmul back to the hidden size, and the row scale applied there
    (hidden-size wide, not vocabulary wide). For a bf16 model the loss is thus read from a bf16 probability (at
    most 0.4 % off, so a token's loss at most 0.004 nats off); the gradient is unchanged. A target probability
    below the smallest representable (a loss over 92 nats in bf16, 103 in fp32 for one token) counts as 103 nats.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                softcap: float | None, chunk: int) -> torch.Tensor:
        wide = torch.promote_types(hidden.dtype, torch.float32)  # fp32 softmax for bf16 models (fp64 in tests)
        tiny = torch.finfo(wide).smallest_normal * torch.finfo(wide).eps  # the smallest subnormal
        total = torch.zeros((), dtype=wide, device=hidden.device)
        grad = torch.empty_like(hidden)
        # Autocast would run the softmax in fp32 (and write fp32 probabilities); the head and hidden states are in the
        # model's dtype already, so with it off the matmuls compute what they computed under it.
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s:s + chunk].to(weight.dtype), targets[s:s + chunk]
                logits = h @ weight.t()
                capped = None
                if softcap:
                    capped = torch.tanh(logits.to(wide) / softcap)
                    logits = capped * softcap
                # One softmax kernel (fp32 math) writing the probabilities in the logits' dtype: the model's without
                # a softcap (half the bytes of fp32 and no cast); with one, fp32 then a cast.
                dlogits = torch.softmax(logits, dim=-1).to(weight.dtype)
                scored = t != IGNORE
                safe = torch.where(scored, t, 0).unsqueeze(1)
                picked = dlogits.gather(1, safe).to(wide)
                total += (-picked.clamp_min(tiny).log().squeeze(1) * scored).sum()
                dlogits.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=dlogits.dtype))
                if capped is not None:
                    dlogits.mul_(1 - capped * capped)
                grad[s:s + chunk] = (dlogits @ weight).to(wide) * (scored * scale).unsqueeze(1)  # scale kept in fp32
        ctx.save_for_backward(grad)
        return total * scale

    @staticmethod
    def backward(ctx: Any, out_grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * out_grad.to(grad.dtype), None, None, None, None, None


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                 softcap: float | None = None, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """(T, H) hidden states, (V, H) frozen head, (T,) targets (``IGNORE`` = not scored) -> scaled loss sum."""
    out: torch.Tensor = _LMHeadLoss.apply(hidden, weight, targets, scale, softcap, chunk)
    return out


class PackedForward:
    """Loss of one bin through the (peft-wrapped) causal LM ``model``: decoder + chunked LM-head loss.

    ``supported(model)`` says whether the packed path applies: the LM head is frozen, attention runs through SDPA
    (which takes boolean masks) and its layer types are ones ``attention_masks`` can express.
    """

    def __init__(self, model: Any, autocast_dtype: torch.dtype | None = None) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()
        self.config = base.config.get_text_config()
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.autocast_dtype = autocast_dtype

    @staticmethod
    def supported(model: Any) -> bool:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        if head is None or head.weight.requires_grad or getattr(head, "bias", None) is not None:
            return False
        if getattr(base.config, "_attn_implementation", None) != "sdpa":  # eager adds masks: it needs floats
            return False
        probe = torch.zeros((1, 1), dtype=torch.long)  # segment ids of one row
        return attention_masks(base.config.get_text_config(), probe) is not None

    def __call__(self, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``data``: a bin's (4, rows, width) tensor on the model's device; returns the scaled loss (0-dim)."""
        ids, positions, segments, targets = data[0], data[1], data[2], data[3].reshape(-1)
        device = data.device.type
        cast = (torch.autocast(device, dtype=self.autocast_dtype, cache_enabled=False)
                if self.autocast_dtype is not None else nullcontext())
        with cast:
            hidden = self.decoder(input_ids=ids, position_ids=positions, use_cache=False,
                                  attention_mask=attention_masks(self.config, segments)).last_hidden_state
            return lm_head_loss(hidden.reshape(-1, hidden.shape[-1]), self.head.weight, targets, scale, self.softcap)
