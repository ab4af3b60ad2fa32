"""Many LoRA adapters on one base model at once, chosen per batch row.

Each targeted Linear gets every adapter slot's A and B stacked into two dense matrices,
``A_all [in, S*R]`` and ``B_all [S*R, out]`` (B pre-scaled by alpha/r). A row's adapter is a 0/1 mask
over the ``S*R`` columns (its slot's block, or none for the base model), so one step is
``base(x) + ((x @ A_all) * mask) @ B_all`` for the whole batch: fixed shapes (CUDA-graph friendly), two
small matmuls instead of peft's per-adapter loop over sub-batches, and for base rows the LoRA term is an
exact zero, so the base output is unchanged with any adapters loaded. Ranks below R are zero-padded
(exact). peft's ``adapter_names`` mixed batches do the same job with one forward per adapter group per
Linear; at 8 adapters that is 8x the kernel launches and no static shapes for CUDA graphs.

Adapters are read from peft's ``adapter_model.safetensors`` only (pickle ``.bin`` is refused).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from app.core.errors import UserFacingError
from app.core.jobs import ALL_PROJECTIONS

TARGETS: tuple[str, ...] = tuple(ALL_PROJECTIONS)  # every projection a job may target (the API's list)


class LoraContext:
    """The mask every MultiLoraLinear of one model multiplies by: set before each forward."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [batch, S*R] (0/1), broadcast over the sequence


class MultiLoraLinear(nn.Module):
    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(self, base: nn.Module, in_features: int, out_features: int, slots: int, rank: int,
                 ctx: LoraContext, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base, self.ctx, self.rank = base, ctx, rank
        self.register_buffer("lora_a", torch.zeros(in_features, slots * rank, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(slots * rank, out_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        mask = self.ctx.mask
        if mask is None:
            return y
        h = (x.to(self.lora_a.dtype) @ self.lora_a) * mask.unsqueeze(1)
        return y + (h @ self.lora_b).to(y.dtype)

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Put one adapter's ``a [r, in]`` and ``b [out, r]`` into ``slot`` (None: clear the slot)."""
        cols = slice(slot * self.rank, (slot + 1) * self.rank)
        self.lora_a[:, cols].zero_()
        self.lora_b[cols].zero_()
        if a is None or b is None:
            return
        r = a.shape[0]
        self.lora_a[:, slot * self.rank: slot * self.rank + r].copy_(a.t())
        self.lora_b[slot * self.rank: slot * self.rank + r].copy_(b.t() * scale)


def _features(module: nn.Module) -> tuple[int, int]:
    return int(getattr(module, "in_features")), int(getattr(module, "out_features"))  # noqa: B009


def install(model: nn.Module, slots: int, rank: int,
            dtype: torch.dtype) -> tuple[LoraContext, dict[str, MultiLoraLinear]]:
    """Wrap every targeted projection of ``model`` (in place); returns the shared context and the wrappers
    by module name (``model.layers.0.self_attn.q_proj``)."""
    ctx = LoraContext()
    wrapped: dict[str, MultiLoraLinear] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and not isinstance(child, MultiLoraLinear):
                full = f"{name}.{child_name}" if name else child_name
                device = next(child.parameters()).device
                wrapper = MultiLoraLinear(child, *_features(child), slots, rank, ctx, dtype, device)
                setattr(module, child_name, wrapper)
                wrapped[full] = wrapper
    return ctx, wrapped


@dataclass
class AdapterWeights:
    """One adapter read from disk: per module name, (A [r, in], B [out, r], scale)."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    rank: int
    nbytes: int


def read_adapter(path: Path, name: str, max_rank: int, known: set[str] | None = None) -> AdapterWeights:
    """Read a peft LoRA folder (safetensors only); UserFacingError for anything this engine cannot serve."""
    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_path.is_file():
        raise UserFacingError("adapter_not_found", f"adapter {name} has no files on this worker")
    if not weights_path.is_file():
        raise UserFacingError("adapter_unsupported", f"adapter {name} has no adapter_model.safetensors "
                              "(pickle .bin adapters are not loaded)")
    cfg = json.loads(config_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("rank_pattern") or \
            cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
        raise UserFacingError("adapter_unsupported", f"adapter {name}: only plain LoRA adapters are served")
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    tensors = load_file(str(weights_path), device="cpu")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    rank = 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None or (known is not None and module not in known):
            raise UserFacingError("adapter_unsupported", f"adapter {name}: module {module} cannot be served")
        r = a.shape[0]
        rank = max(rank, r)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[module] = (a, b, scale)
    if rank > max_rank:
        raise UserFacingError("adapter_unsupported",
                              f"adapter {name} has rank {rank}; this worker serves ranks up to {max_rank} "
                              "(FTAAS_SERVE_LORA_MAX_RANK)")
    if not modules:
        raise UserFacingError("adapter_unsupported", f"adapter {name} holds no LoRA weights")
    nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in modules.values())
    return AdapterWeights(name, modules, rank, nbytes)


def write_slot(wrapped: dict[str, MultiLoraLinear], slot: int, adapter: AdapterWeights | None) -> None:
    """Load ``adapter`` into ``slot`` of every wrapper (modules it does not target get zeros)."""
    for name, module in wrapped.items():
        a, b, scale = adapter.modules.get(name, (None, None, 1.0)) if adapter else (None, None, 1.0)
        module.write(slot, a, b, scale)
