"""Left padding: how rows of different lengths share one batch (the graph contract's layout)."""

from __future__ import annotations

import numpy as np


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids) [batch, longest]; pads on the left, mask 0.

    Positions count real tokens only (padding gets 0), as transformers' generate computes them.
    """
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions
