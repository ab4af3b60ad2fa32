"""Fewer, fused kernels for the GPU fast path's training forward and backward (same formulas).

Under CUDA graphs the training step is bound by the GPU's own time, of which elementwise kernels took about a third
(RESULTS.md run T5 profile): transformers' Gemma RMSNorm is six of them with fp32 round trips, and peft's LoRA adds
two full-width passes per projection (``* scaling``, ``+ result``). Both are replaced here, module by module:

* ``fuse_gemma_norms``: each Gemma RMSNorm (fp32 math, weight ``1 + w``) through ``F.rms_norm``, ATen's fused
  RMSNorm kernel, forward and backward: x * rsqrt(mean(x^2) + eps) * (1 + w) in fp32, cast back.
* ``fuse_lora_linears``: a LoRA projection as ``base(x)`` + one ``addmm`` that computes ``result + scaling x
  (A(x) @ B^T)`` in the B matmul's epilogue (one rounding instead of three).

Only the summation order differs from transformers'/peft's code; ``tests/train/test_fast_path.py`` compares both on the
CPU. Anything these forwards do not cover (several or disabled adapters, merged weights, DoRA, bias on B, extra
arguments) runs the original forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_GEMMA_NORMS = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"}


def fuse_gemma_norms(model: torch.nn.Module) -> int:
    """Gemma RMSNorms through the fused kernel (frozen weights under LoRA). Returns the number changed."""
    n = 0
    for module in model.modules():
        if type(module).__name__ in _GEMMA_NORMS and isinstance(getattr(module, "eps", None), float):
            module.forward = _fused_norm(module)  # type: ignore[method-assign]
            n += 1
    return n


def _fused_norm(norm: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    eps = float(norm.eps)

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = norm.weight.float() + 1.0
        return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), weight, eps).type_as(x)

    return forward


def fuse_lora_linears(model: torch.nn.Module) -> int:
    """peft LoRA ``Linear`` layers with the B matmul, scaling and residual add in one ``addmm``. Returns the count."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = _fused_lora(module, module.forward)  # type: ignore[method-assign]
            n += 1
    return n


def _fused_lora(layer: Any, original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = layer.active_adapters
        if (args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1
                or active[0] not in layer.lora_A or active[0] in layer.lora_variant
                or layer.lora_B[active[0]].bias is not None):
            return original(x, *args, **kwargs)
        name = active[0]
        a, b = layer.lora_A[name], layer.lora_B[name]
        result = layer.base_layer(x)
        low = a(layer.lora_dropout[name](x.to(a.weight.dtype)))
        # Out of place: an in-place addmm_ on the base output made cuBLAS copy it through column-major temporaries
        # (RESULTS.md run T7: four times the copies, 9 % of the GPU time).
        out = torch.addmm(result.reshape(-1, result.shape[-1]).to(b.weight.dtype), low.reshape(-1, low.shape[-1]),
                          b.weight.t(), alpha=layer.scaling[name])
        return out.view(result.shape).to(result.dtype)

    return forward
