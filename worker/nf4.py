"""NF4 bases dequantised once, for training (worker/train/fast_path.py) and serving (worker/serve/pool.py).

``dequantize_nf4`` is bnb's own dequantisation through transformers (``model.dequantize``): the values the NF4
forward dequantises on every call (and an adapter was trained against), computed once, so the matmuls run in bf16
without a per-call dequantize (bench/train_bench.py ``check_dequant`` checks the weights bit for bit against
``bnb.functional.dequantize_4bit``). Serving logs how many layers it replaced: ``nf4_layer_count`` beforehand.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


def nf4_layer_count(model: nn.Module) -> int:
    """How many bitsandbytes ``Linear4bit`` layers ``model`` holds (what ``dequantize_nf4`` replaces)."""
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def dequantize_nf4(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Replace every bnb ``Linear4bit`` with a plain Linear holding bnb's dequantised weight (transformers'
    ``dequantize``): the same values the NF4 forward dequantises on every call, computed once. Returns the model
    (use the returned object).

    The model keeps ``is_loaded_in_4bit`` so that trl still casts the LoRA weights to bf16 as for QLoRA.
    """
    was_4bit = bool(getattr(model, "is_loaded_in_4bit", False))
    try:
        model = model.dequantize(dtype=dtype) or model
    except TypeError:  # transformers releases whose dequantize() takes no dtype dequantize to the load dtype
        model = model.dequantize() or model
    model.is_loaded_in_4bit = was_4bit  # type: ignore[assignment]
    return model
