"""A KV cache that stays in device memory between steps (IO-binding and TensorRT backends).

The graph reads past [B, KV, P, D] and writes present [B, KV, P+S, D]. Each cache tensor gets two
preallocated buffers of the full capacity: a step reads past from one and writes present into the
other, then they swap roles. A [B, KV, T, D] tensor is dense at the start of a buffer whatever T,
so no step allocates or copies the cache, and nothing but token ids and logits crosses to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import QwenDeployError


def check_step(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    position_ids: np.ndarray,
    batch: int,
    length: int,
    capacity: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate one step's inputs against the cache; returns them as contiguous int64 arrays."""
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
    pos = np.ascontiguousarray(position_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise QwenDeployError(f"input_ids must be [batch, seq] with seq >= 1, got {ids.shape}.")
    rows, seq = ids.shape
    if rows != batch:
        raise QwenDeployError(
            f"the cache holds {batch} sequence(s) but input_ids has {rows} row(s); "
            "create a cache with new_cache(batch) for this batch size."
        )
    if mask.shape != (rows, length + seq):
        raise QwenDeployError(
            f"attention_mask must cover the cached and the new tokens: expected "
            f"{[rows, length + seq]}, got {list(mask.shape)}."
        )
    if pos.shape != ids.shape:
        raise QwenDeployError(
            f"position_ids must have the shape of input_ids {list(ids.shape)}, got "
            f"{list(pos.shape)}."
        )
    if length + seq > capacity:
        raise QwenDeployError(
            f"this step needs {length + seq} cached positions but the cache holds {capacity}; "
            "raise the backend's max_seq_len (for TensorRT: rebuild with a larger --max-seq-len)."
        )
    return ids, mask, pos


@dataclass
class DeviceKVCache:
    """Per cache tensor (past name) a pair of device buffers; `current` holds the cache."""

    batch: int
    capacity: int
    buffers: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    length: int = 0
    current: int = 0

    def read(self, name: str) -> Any:
        """The buffer holding past for `name`."""
        return self.buffers[name][self.current]

    def write(self, name: str) -> Any:
        """The buffer the next step writes present into."""
        return self.buffers[name][1 - self.current]

    def advance(self, seq: int) -> None:
        """After a step: the written buffers now hold the cache, `seq` positions longer."""
        self.current = 1 - self.current
        self.length += seq
