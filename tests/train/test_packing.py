"""worker/train/packing.py and the fast path's micro-batches: packed bins keep every token and target of every
example and mask the examples apart; length-grouped micro-batches keep every row within the token budget."""

from __future__ import annotations

import torch

from worker.train.fast_path import label_tokens, micro_batches
from worker.train.packing import block_causal_mask


def test_micro_batches_respect_the_budget_and_keep_every_row() -> None:
    lengths = [30, 7, 120, 31, 29, 5, 64, 64, 300]
    groups = micro_batches(lengths, budget=128)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) == 1 or len(g) * longest <= 128
        assert lengths[g[0]] == longest
    assert groups[0] == [8]  # longer than the budget: alone
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths, reverse=True)  # length-grouped


def test_packing_keeps_every_token_and_target_and_masks_examples_apart() -> None:
    from worker.train.packing import bin_rows, bin_size, capacity_for, pack

    lengths = [5, 3, 7, 2, 9, 40]
    width = max(lengths)
    ids = torch.zeros((6, width), dtype=torch.long)
    mask = torch.zeros((6, width), dtype=torch.long)
    labels = torch.full((6, width), -100)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(100 * (i + 1), 100 * (i + 1) + n)
        mask[i, :n] = 1
        labels[i, :n] = ids[i, :n]
        labels[i, 0] = -100  # a prompt token: never a target
    labels[1, :2] = -100
    assert bin_rows(lengths[:5], 12) == [[4, 1], [2, 0], [3]]  # first fit, longest first: 9+3, 7+5, 2
    assert capacity_for(40) == 64 and capacity_for(1024) == 1024 and capacity_for(1025) == 2048
    # rows spread evenly over as few bins as the budget allows, an even count a bin: 28-30 rows -> 3 x 10
    assert [bin_size(r, 12) for r in (28, 29, 30, 25, 13, 12, 3, 1)] == [10, 10, 10, 10, 8, 12, 4, 1]
    assert bin_size(7, 3) == 3  # never over the budget

    one_row = pack(ids, mask, labels, budget=128, pad_id=0)  # rows as wide as the budget: one row a bin
    rows = pack(ids, mask, labels, budget=128, pad_id=0, row_width=16)  # rows 64 wide (the longest example's)
    for bins in (one_row, rows):
        assert sum(b.tokens for b in bins) == sum(lengths)
        assert sum(b.targets for b in bins) == label_tokens(labels)
    assert [b.shape for b in one_row] == [(1, 128)]
    assert [b.shape for b in rows] == [(2, 64)]  # 40+9+7+5+3 | 2, a bin of two rows of 64
    first = rows[0].data[:, 0]  # row 0: examples 5 (40 tokens), 4 (9), 2 (7), 0 (5), 1 (3)
    assert first[0, 40:49].tolist() == list(range(500, 509))
    assert first[1, :52].tolist() == list(range(40)) + list(range(9)) + [0, 1, 2]
    assert first[2, 38:64].tolist() == [0] * 2 + [1] * 9 + [2] * 7 + [3] * 5 + [4] * 3
    assert first[3, 40:49].tolist() == [*list(range(501, 509)), -100]
    second = rows[0].data[:, 1]  # row 1: example 3 (2 tokens), then padding
    assert second[0, :3].tolist() == [400, 401, 0] and second[2, :3].tolist() == [0, 0, 1]
    assert second[3, :3].tolist() == [401, -100, -100]
    m = block_causal_mask(rows[0].data[2])
    assert m.shape == (2, 1, 64, 64)
    m = m[0, 0]
    assert m[41, 40] and not m[41, 39] and not m[40, 41] and m[39, 0] and not m[0, 1]  # causal, own example only
    assert m.any(dim=1).all()  # every query (padding too) attends to something: no empty softmax row
    w = block_causal_mask(rows[0].data[2], window=4)[0, 0]
    assert w[44, 41] and not w[44, 40] and w[44, 44]
