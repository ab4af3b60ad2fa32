"""Packing a step's examples into a few fixed-shape bins, without any example attending to another.

A bin is ``rows x width`` tokens: each row holds whole examples back to back; ``position_ids`` restart at 0 for
each example and the attention mask is block-diagonal and causal within each row (built on the device from the
segment ids), so every example computes exactly what it computes alone. Next-token targets are shifted inside
each example (its last token scores nothing), so the loss is the one of the unpacked batch.

Rows are short (``ROW_WIDTH``, or the longest example's capacity): attention runs over each row's whole
width x width mask, so its cost per token grows with the row width, while the matmuls see rows x width tokens.
Shapes come from short lists (widths: powers of two up to ``CAPACITY_STEP``, then its multiples; rows: an even
count, ``bin_size``), so a run reuses a few shapes: what lets ``worker.train.cuda_graphs`` replay one graph per shape.

``PackingCollator`` packs in the training DataLoader, on the host: the batch never goes to the device unpacked
and back (a device-to-host copy waits for the GPU to finish the previous step), so the host can prepare the next
step while the GPU trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

CAPACITY_STEP = 1024
SMALLEST = 64
ROW_WIDTH = 256
IGNORE = -100


def capacity_for(tokens: int) -> int:
    """The bin shape for ``tokens`` real tokens: the next power of two (at least ``SMALLEST``) up to
    ``CAPACITY_STEP``, then the next multiple of it."""
    if tokens <= CAPACITY_STEP:
        return max(SMALLEST, 1 << max(0, tokens - 1).bit_length())
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


def bin_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices in bins of at most ``budget`` tokens, first-fit over the rows longest first (a row longer
    than the budget gets a bin of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for b, n in enumerate(used):
            if n + lengths[i] <= budget:
                bins[b].append(i)
                used[b] += lengths[i]
                break
        else:
            bins.append([i])
            used.append(lengths[i])
    return bins


def bin_size(rows: int, per_bin: int) -> int:
    """Rows per bin for a step of ``rows`` rows: as few bins as ``per_bin`` allows, the rows spread evenly over
    them (rounded up to an even count, so that steps of similar size share one bin shape, hence one CUDA graph).

    On the 651 quotes (256 examples a step, rows of 256, 12 rows a bin: 28-30 rows a step) every step is three
    bins of 10 rows: 92.3 % of the bins' tokens are real, against 90.5 % with full bins and the last one's rows
    rounded up to a power of two (12 + 12 + 4 or 8: three shapes to capture).
    """
    bins = -(-rows // per_bin)
    even = -(-rows // bins)
    return min(per_bin, even + even % 2) if even > 1 else 1


@dataclass
class PackedBin:
    """``data`` is (4, rows, width) int64: input ids, position ids, segment ids, next-token targets."""

    data: torch.Tensor
    row_tokens: list[int]  # real (non-padding) tokens at the start of each row
    targets: int  # scored tokens

    @property
    def tokens(self) -> int:
        return sum(self.row_tokens)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row's ones come first (what the packing below assumes)."""
    return bool((attention_mask.cumprod(dim=1).sum(dim=1) == attention_mask.sum(dim=1)).all())


def _fill(data: torch.Tensor, rows: list[int], input_ids: torch.Tensor, mask: torch.Tensor, nxt: torch.Tensor,
          pad_id: int) -> int:
    """Examples ``rows`` back to back in the (4, width) ``data``; the padding after them is a segment of its own
    that scores nothing (it attends only to itself, so no row of the mask is empty). Returns the tokens used."""
    index = torch.tensor(rows, dtype=torch.long)
    m = mask[index]
    used = int(m.sum())
    width = data.shape[1]
    data[0, :used] = input_ids[index][m]
    data[1, :used] = (m.cumsum(dim=1) - 1)[m]
    data[2, :used] = torch.arange(len(rows)).unsqueeze(1).expand_as(m)[m]
    data[3, :used] = nxt[index][m]
    data[0, used:] = pad_id
    data[1, used:] = torch.arange(width - used)
    data[2, used:] = len(rows)
    data[3, used:] = IGNORE
    return used


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, budget: int,
         pad_id: int, row_width: int = ROW_WIDTH) -> list[PackedBin]:
    """The right-padded batch as bins of at most ``budget`` tokens (host tensors; a longer example gets a bin of
    its own), rows ``row_width`` wide (at most ``budget``, at least the longest example's capacity)."""
    input_ids, attention_mask, labels = input_ids.cpu(), attention_mask.cpu().bool(), labels.cpu()
    lengths = [int(n) for n in attention_mask.sum(dim=1).tolist()]
    longest = max(lengths)
    width = max(capacity_for(longest), min(row_width, budget))
    per_bin = max(1, budget // width)
    # Next-token targets per row: the label of the following token, where that token is still in the row.
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = torch.where(attention_mask[:, 1:], labels[:, 1:], IGNORE)
    packed_rows = bin_rows(lengths, width)
    if len(packed_rows) == 1:  # a lone row: only as wide as it needs
        shape = (1, capacity_for(sum(lengths[i] for i in packed_rows[0])))
    else:
        shape = (bin_size(len(packed_rows), per_bin), width)
    out = []
    for start in range(0, len(packed_rows), shape[0]):
        group = packed_rows[start:start + shape[0]]
        data = torch.empty((4, *shape), dtype=torch.long)
        used = [_fill(data[:, r], group[r] if r < len(group) else [], input_ids, attention_mask, nxt, pad_id)
                for r in range(shape[0])]  # rows past the group: padding, one segment each, nothing scored
        out.append(PackedBin(data, used, int((data[3] != IGNORE).sum())))
    return out


@dataclass
class PackedStep:
    """One optimizer step's examples as packed bins (host tensors): what ``PackingCollator`` yields. Has no
    ``to()``, so accelerate's device placement leaves it on the host; the DataLoader pins it."""

    bins: list[PackedBin]

    def pin_memory(self, device: Any = None) -> PackedStep:
        return PackedStep([replace(b, data=b.data.pin_memory()) for b in self.bins])


class PackingCollator:
    """Wraps the trainer's collator: a right-padded batch becomes ``{"packed": PackedStep}``; any other batch
    (left padding, no attention mask) passes unchanged, for the trainer's padded path."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]], budget: int, pad_id: int) -> None:
        self.collate, self.budget, self.pad_id = collate, budget, pad_id

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        batch = self.collate(examples)
        mask = batch.get("attention_mask")
        if mask is None or not is_right_padded(mask):
            return batch
        return {"packed": PackedStep(pack(batch["input_ids"], mask, batch["labels"], self.budget, self.pad_id))}


def block_causal_mask(segments: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(rows, 1, T, T) bool from (rows, T) segment ids, True where query i may attend key j of its row: same
    segment, j <= i (and i - j < ``window``)."""
    t = segments.shape[-1]
    idx = torch.arange(t, device=segments.device)
    diff = idx[:, None] - idx[None, :]
    mask = (segments[:, :, None] == segments[:, None, :]) & (diff >= 0)
    if window is not None:
        mask = mask & (diff < window)
    return mask.unsqueeze(1)


def attention_masks(config: object, segments: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """What the decoder takes as ``attention_mask`` for packed bins: one mask, or one per layer type (Gemma 2/3
    mix sliding-window and full layers). None for layer types this does not know (the caller falls back)."""
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not types <= {"full_attention", "sliding_attention"}:
        return None
    full = block_causal_mask(segments)
    if types == {"full_attention"}:
        return full
    window = getattr(config, "sliding_window", None)
    return {"full_attention": full,
            "sliding_attention": block_causal_mask(segments, window) if window else full}
