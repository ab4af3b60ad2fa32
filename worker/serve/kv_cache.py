"""The decode KV cache of worker.serve.engine: one static row per running prompt."""

from __future__ import annotations

from typing import Any

import torch


class SlotCache:
    """Static K/V per layer, ``[rows, kv_heads, length, head_dim]``; each row writes at its own position.

    Prefill mode writes a group of rows from position 0 and attends over the prompt alone; decode mode
    writes one token per row at ``pos[row]`` and returns the first ``n`` rows' whole cache (the mask hides
    what a row has not written)."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, length: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (rows, kv_heads, length, head_dim)
        # per layer [rows, kv_heads, length, head_dim]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows_idx = torch.arange(rows, device=device)  # [rows]
        self.prefill_rows: torch.Tensor | None = None  # [group] cache rows being prefilled, or None when decoding
        self.pos: torch.Tensor | None = None  # [n] each decoding row's write position
        self.length = length
        self.is_compileable = True

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self.prefill_rows is not None:
            t = key.shape[2]
            k[self.prefill_rows, :, :t] = key
            v[self.prefill_rows, :, :t] = value
            return key, value
        assert self.pos is not None
        n = key.shape[0]
        k[self.rows_idx[:n], :, self.pos] = key[:, :, 0]
        v[self.rows_idx[:n], :, self.pos] = value[:, :, 0]
        return k[:n], v[:n]

    def grow(self, length: int) -> None:
        """A longer cache (eager mode only), the rows' K/V kept."""
        for layer in (self.k, self.v):
            for i, old in enumerate(layer):
                new = old.new_zeros(*old.shape[:2], length, old.shape[3])
                new[:, :, : self.length] = old
                layer[i] = new
        self.length = length
