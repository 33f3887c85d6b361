"""The interface every runtime backend implements: feed tokens, keep the cache, get logits."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..manifest import Manifest


class KVCache(Protocol):
    """Backend-owned cache state for a batch of sequences; opaque to callers except its length."""

    @property
    def length(self) -> int:
        """Positions already cached (past_sequence_length)."""


class Backend(Protocol):
    manifest: Manifest

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache for `batch` sequences."""

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        last_only: bool = False,
    ) -> np.ndarray:
        """Run one step; returns float32 logits [batch, seq, vocab] and extends `cache` in place.

        attention_mask covers cache + new tokens ([batch, cache.length + seq]). With `last_only`
        the logits are [batch, 1, vocab] (the last position), which spares a prefill the LM head
        over every prompt position where the graph allows it.
        """
