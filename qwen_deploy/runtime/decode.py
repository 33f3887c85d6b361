"""The one prefill/decode loop: rows of sequences on one backend's KV cache, fed a prompt, a chunk
or a token at a time.

The generator, the batching engine, speculative decoding, parity and the quality report all run
their models through a Batch, so attention masks, position ids and the cache's bookkeeping are
written once. Two layouts:
- left-padded (every backend): the mask marks real positions and a token's position is the count
  of real tokens before it (padding gets 0), as transformers' generate computes it;
- rows of their own length (`own_lengths`, where the backend's capabilities allow it: the gqa
  form): each row's cache holds its tokens from position 0 and is right-padded, a row's new
  tokens go after its own length and its attention spans its own positions only, so a row's
  logits do not depend on the other rows' lengths (bit for bit on onnxruntime CPU).
Either way each row gets the tokens it would get alone. Rows leave (`keep`) and join (`merge`)
by rebuilding the cache from host arrays: a copy per change of the batch, not per token. Rows of
their own length on a backend with row slots (onnxruntime CPU, in place) skip the rebuild: a
newcomer's positions are copied into a free slot and the rows after one that leaves move down.
"""

from __future__ import annotations

import numpy as np

from .backend import Backend
from .padding import left_pad


class Batch:
    """Sequences decoding together: a backend, its cache, and the attention mask over it."""

    def __init__(
        self,
        backend: Backend,
        rows: int,
        capacity: int | None = None,
        own_lengths: bool = False,
    ):
        """An empty batch of `rows` sequences; `capacity`: positions to make room for;
        `own_lengths`: rows of their own length (right-padded) instead of left-padded."""
        if own_lengths and not backend.capabilities.own_row_lengths:
            raise ValueError("this backend's rows share one length: they are left-padded")
        self.backend = backend
        self.capacity = capacity
        self.own_lengths = own_lengths
        # rows a rebuilt cache makes room for, so later joins copy only the newcomers' positions
        # (backends with row slots; set by `reserve`)
        self.slots: int | None = None
        self.cache = backend.new_cache(rows, capacity)
        self.mask = np.zeros((rows, 0), np.int64)

    @classmethod
    def resume(
        cls,
        backend: Backend,
        arrays: dict[str, np.ndarray],
        capacity: int | None = None,
        own_lengths: bool = False,
    ) -> Batch:
        """One row whose cache already holds `arrays` ([1, kv_heads, length, head_dim] per cache
        name, no padding: a cached prefix)."""
        batch = cls(backend, 0, own_lengths=own_lengths)
        length = next(iter(arrays.values())).shape[2]
        batch._rebuild(arrays, np.ones((1, length), np.int64), capacity)
        return batch

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        """Positions the cache holds (real and padding)."""
        return self.mask.shape[1]

    def inputs(
        self, ids: np.ndarray, real: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(attention_mask, position_ids) for feeding `ids` [rows, n] next; `real` marks which
        of them are tokens (1) or left padding (0), all tokens by default (rows of their own
        length take no padding: each row's tokens go after its own length)."""
        if self.own_lengths:
            if real is not None and not real.all():
                raise ValueError("rows of their own length take no padding in what they are fed")
            lengths = self.mask.sum(axis=1)
            seq = ids.shape[1]
            width = int(lengths.max(initial=0)) + seq
            mask = (np.arange(width)[None] < (lengths + seq)[:, None]).astype(np.int64)
            return mask, lengths[:, None] + np.arange(seq)[None]
        real = np.ones(ids.shape, np.int64) if real is None else real
        mask = np.concatenate([self.mask, real], axis=1)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1] :]
        return mask, positions

    def extend(
        self,
        ids: np.ndarray,
        real: np.ndarray | None = None,
        last_only: bool = False,
        chunk: int | None = None,
    ) -> np.ndarray:
        """Feed `ids` [rows, n] after what the cache holds; logits [rows, n, vocab] (or
        [rows, 1, vocab] with `last_only`). `chunk` feeds at most that many positions per step
        (a long prompt's activations stay bounded; with `last_only` only the last is kept)."""
        ids = np.asarray(ids, np.int64)
        real = np.ones(ids.shape, np.int64) if real is None else np.asarray(real, np.int64)
        step = chunk or ids.shape[1]
        outputs = []
        for start in range(0, ids.shape[1], step):
            part, part_real = ids[:, start : start + step], real[:, start : start + step]
            mask, positions = self.inputs(part, part_real)
            logits = self.backend.forward(part, mask, positions, self.cache, last_only=last_only)
            self.mask = mask
            if not last_only or start + step >= ids.shape[1]:
                outputs.append(logits)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=1)

    def prefill(
        self,
        prompts: list[list[int]],
        pad_id: int,
        last_only: bool = True,
        chunk: int | None = None,
    ) -> np.ndarray:
        """Feed each row its prompt, left-padded to the longest (rows of their own length: prompts
        of one length); logits as `extend` returns."""
        ids, real, _ = left_pad(prompts, pad_id)
        return self.extend(ids, real, last_only=last_only, chunk=chunk)

    def step(self, tokens: np.ndarray | list[int]) -> np.ndarray:
        """Feed one token per row; the next-token logits [rows, vocab]."""
        ids = np.asarray(tokens, np.int64).reshape(self.rows, 1)
        return self.extend(ids, last_only=True)[:, -1]

    def step_with_chunk(
        self, tokens: np.ndarray | list[int], prefill: Batch, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`step(tokens)` and `prefill.extend(ids, last_only=True)` (a one-row batch, rows of
        their own length) as one forward, where the backend runs mixed steps: the rows'
        next-token logits [rows, vocab] and the chunk's last [vocab], what the two calls
        return."""
        tokens = np.asarray(tokens, np.int64).reshape(self.rows, 1)
        ids = np.asarray(ids, np.int64)
        mask, positions = self.inputs(tokens)
        chunk_mask, chunk_positions = prefill.inputs(ids)
        rows, chunk = self.backend.forward_mixed(
            (tokens, mask, positions, self.cache),
            (ids, chunk_mask, chunk_positions, prefill.cache),
        )
        self.mask, prefill.mask = mask, chunk_mask
        return rows[:, -1], chunk[0, -1]

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (draft tokens a verify step rejected)."""
        self.backend.truncate(self.cache, length)
        self.mask = self.mask[:, :length]

    def keep(self, rows: list[int], capacity: int | None = None) -> None:
        """Only `rows` stay, without the columns that are padding in all of them (no copy when
        that is all of it and the cache already has room for `capacity`)."""
        mask = self.mask[rows]
        first, end = _span(mask)
        unchanged = rows == list(range(self.rows)) and first == 0 and end == self.length
        if unchanged and self.capacity is not None and (capacity or 0) <= self.capacity:
            return
        if self._in_place_rows:  # the rows that stay move down over those that leave
            lengths = mask.sum(axis=1)
            if self.backend.keep_rows(self.cache, rows, lengths, end):
                self.mask = np.ascontiguousarray(mask[:, :end])
                return
        self._copy(rows, first, end, capacity)

    def reserve(self, slots: int, capacity: int | None = None) -> None:
        """Room for `slots` rows, so that rows which join later (backends with row slots) copy
        only their own positions: the cache is rebuilt with them now, once; `keep` otherwise."""
        self.slots = slots
        if self._in_place_rows:
            self._copy(list(range(self.rows)), *_span(self.mask), capacity)
        else:
            self.keep(list(range(self.rows)), capacity)

    def _copy(self, rows: list[int], first: int, end: int, capacity: int | None) -> None:
        """The cache rebuilt with only `rows` and the columns [first, end) from host arrays."""
        arrays = self.backend.cache_arrays(self.cache)
        if self.own_lengths:  # each row's own positions: what lies past them is never read
            lengths = self.mask.sum(axis=1)
            parts = [{k: v[r : r + 1, :, : lengths[r]] for k, v in arrays.items()} for r in rows]
        else:
            parts = [{k: v[rows, :, first:end] for k, v in arrays.items()}]
        mask = np.ascontiguousarray(self.mask[rows, first:end])
        self._rebuild(_stack(parts, end - first, self.own_lengths), mask, capacity)

    def merge(
        self, other: Batch, capacity: int | None = None, rows: list[int] | None = None
    ) -> None:
        """Append `other`'s rows (all, or `rows` of them; same backend and layout), padding the
        shorter side's cache (on the left, or on the right for rows of their own length)."""
        if other.own_lengths != self.own_lengths:
            raise ValueError("batches of different layouts do not merge")
        rows = list(range(other.rows)) if rows is None else rows
        length = max(self.length, other.length)
        theirs = other.backend.cache_arrays(other.cache)
        if self._in_place_rows:  # into free slots: only the newcomers' positions are copied
            lengths = other.mask[rows].sum(axis=1)
            every = rows == list(range(other.rows))
            joining = theirs if every else {k: v[rows] for k, v in theirs.items()}
            if self.backend.add_rows(self.cache, joining, lengths, length):
                self.mask = np.concatenate(
                    [_pad(m, length, right=True) for m in (self.mask, other.mask[rows])]
                )
                return
        parts = [self.backend.cache_arrays(self.cache), {k: v[rows] for k, v in theirs.items()}]
        mask = np.concatenate(
            [_pad(m, length, self.own_lengths) for m in (self.mask, other.mask[rows])]
        )
        self._rebuild(_stack(parts, length, self.own_lengths), mask, capacity)

    def _rebuild(
        self, arrays: dict[str, np.ndarray], mask: np.ndarray, capacity: int | None
    ) -> None:
        self.capacity = capacity if capacity is not None else self.capacity
        lengths = mask.sum(axis=1) if self.own_lengths else None
        slots = {"slots": self.slots} if self._in_place_rows and self.slots else {}
        self.cache = self.backend.cache_from_arrays(
            arrays, mask.shape[1], self.capacity, lengths, **slots
        )
        self.mask = mask

    @property
    def _in_place_rows(self) -> bool:
        return self.own_lengths and self.backend.capabilities.row_slots


def _span(mask: np.ndarray) -> tuple[int, int]:
    """The first and the end column that any row of `mask` uses ((0, 0) for none)."""
    used = np.flatnonzero(mask.any(axis=0))
    return (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)


def _stack(parts: list[dict[str, np.ndarray]], length: int, right: bool) -> dict[str, np.ndarray]:
    """Rows of several caches ([rows, kv_heads, positions, head_dim] per name) as one cache of
    `length` positions, each part zero-padded on the right or the left (zeros are masked-out
    positions; untouched zero pages cost no memory)."""
    if len(parts) == 1 and next(iter(parts[0].values())).shape[2] == length:
        return parts[0]
    stacked = {}
    for name, first in parts[0].items():
        rows = sum(part[name].shape[0] for part in parts)
        out = np.zeros((rows, first.shape[1], length, first.shape[3]), first.dtype)
        row = 0
        for part in parts:
            array = part[name]
            n, width = array.shape[0], array.shape[2]
            columns = slice(0, width) if right else slice(length - width, length)
            out[row : row + n, :, columns] = array
            row += n
        stacked[name] = out
    return stacked


def _pad(mask: np.ndarray, length: int, right: bool) -> np.ndarray:
    """Zero-pad a mask [rows, positions] to `length` positions, on the right or the left."""
    missing = length - mask.shape[1]
    return np.pad(mask, [(0, 0), (0, missing) if right else (missing, 0)])
