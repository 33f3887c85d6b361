"""The interface every runtime backend implements, and the choice of backend for an artifact.

A backend owns its KV cache: it allocates one for a batch, runs steps that extend it, hands out
host copies of it and builds one from host arrays (how rows leave and join a running batch),
rolls it back (speculative decoding) and frees device memory on close. What it cannot do is said
in its Capabilities, never found out by probing attributes. Callers drive backends through
runtime.decode.Batch, the one prefill/decode loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..manifest import Manifest

BACKENDS = ("onnxruntime", "tensorrt")
# --provider names -> onnxruntime execution providers
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class KVCache(Protocol):
    """Backend-owned cache state for a batch of sequences; opaque to callers except its length."""

    @property
    def length(self) -> int:
        """Positions already cached (past_sequence_length)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run: limits the batching engine and the generator plan around."""

    device: str  # "cpu" | "cuda"
    max_batch: int | None  # rows one cache holds (None: no limit of its own)
    max_positions: int  # positions one cache holds: prompt + output
    batch_chunks_with_past: bool  # a step of several tokens on several rows after a past
    kv_bytes_per_position: int  # one row's cache, every layer's key and value, per position
    # rows of one cache may have lengths of their own (right-padded; runtime.decode.Batch)
    own_row_lengths: bool = False
    # a step's decode and one row's prefill chunk run as one forward (runtime/mixed_step.py)
    mixed_steps: bool = False
    # rows of their own length join and leave a cache in place (add_rows, keep_rows), without
    # rebuilding it
    row_slots: bool = False


def kv_bytes(manifest: Manifest, itemsize: int) -> int:
    """Bytes one row's cache takes per position: every layer's key and value."""
    m = manifest.model
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * itemsize


class Backend(Protocol):
    manifest: Manifest
    capabilities: Capabilities

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty cache for `batch` sequences; `capacity` (positions) lets a backend that
        preallocates size it for the run (None: its default)."""

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

    def cache_arrays(self, cache: KVCache) -> dict[str, np.ndarray]:
        """Host copies of the cache: past name -> [batch, kv_heads, length, head_dim]."""

    def cache_from_arrays(
        self,
        arrays: dict[str, np.ndarray],
        length: int,
        capacity: int | None = None,
        lengths: np.ndarray | None = None,
    ) -> KVCache:
        """A cache holding `arrays` (as cache_arrays returns them), with room for `capacity`;
        `lengths`: rows of their own length, only each row's first `lengths[row]` positions
        matter (a backend may copy only those)."""

    def truncate(self, cache: KVCache, length: int) -> None:
        """Forget every cached position from `length` on (rejected draft tokens)."""

    def close(self) -> None:
        """Free the model and its device memory; the backend is unusable afterwards."""
