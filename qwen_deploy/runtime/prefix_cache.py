"""KV of prompt prefixes, kept by token block so a request that starts like an earlier one (a
system prompt, a conversation's history) prefills only what is new.

A block holds `block` tokens' keys and values of every layer. It is found by its tokens and its
parent block (vLLM's automatic prefix caching, with exact keys instead of hashes), so a lookup
walks a prompt block by block and stops at the first miss. Only prefill-computed KV is stored: a
prefill gives every position the same values however it is chunked (chunks of two or more tokens
round alike), while a decode step's one-token forward rounds differently, so reused prompt KV
keeps the output bit for bit that of a full prefill. Blocks are evicted least recently used,
leaves before the blocks they extend, within a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

BLOCK_TOKENS = 16


@dataclass
class _Block:
    key: tuple[int, tuple[int, ...]]  # (parent block id, this block's tokens)
    kv: np.ndarray  # [cache tensors, kv_heads, block, head_dim], in `names` order


class PrefixCache:
    """Prompt KV by token block, within `budget_bytes` (host memory)."""

    def __init__(self, names: list[str], budget_bytes: int, block: int = BLOCK_TOKENS):
        self.names = list(names)
        self.budget = int(budget_bytes)
        self.block = block
        self._ids: dict[tuple[int, tuple[int, ...]], int] = {}
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self._next_id = 1  # 0 is the root: the empty prefix
        self.bytes = 0
        self.queries = 0
        self.hits = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def _chain(self, tokens: list[int], limit: int) -> list[int]:
        """Ids of the cached blocks that start `tokens`, at most `limit` tokens of them."""
        chain, parent = [], 0
        for start in range(0, limit - self.block + 1, self.block):
            block_id = self._ids.get((parent, tuple(tokens[start : start + self.block])))
            if block_id is None:
                break
            chain.append(block_id)
            parent = block_id
        return chain

    def _touch(self, chain: list[int]) -> None:
        for block_id in reversed(chain):  # the root side ends most recent: leaves go first
            self._blocks.move_to_end(block_id)

    def lookup(self, tokens: list[int], limit: int) -> tuple[int, dict[str, np.ndarray] | None]:
        """The longest cached prefix of `tokens`, whole blocks and at most `limit` tokens:
        (its length, host arrays [1, kv_heads, length, head_dim] per cache name, or None)."""
        chain = self._chain(tokens, max(limit, 0))
        self.queries += 1
        self.prompt_tokens += len(tokens)
        if not chain:
            return 0, None
        self._touch(chain)
        self.hits += 1
        length = len(chain) * self.block
        self.cached_tokens += length
        kv = np.concatenate([self._blocks[i].kv for i in chain], axis=2)
        return length, {name: kv[j][None] for j, name in enumerate(self.names)}

    def insert(self, tokens: list[int], arrays: dict[str, np.ndarray]) -> None:
        """Keep the whole blocks of `tokens`, whose KV is `arrays` (one row, as a prefill left it:
        [1, kv_heads, >= len(tokens), head_dim] per cache name)."""
        chain, parent = [], 0
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = (parent, tuple(tokens[start : start + self.block]))
            block_id = self._ids.get(key)
            if block_id is None:
                kv = np.stack([arrays[n][0, :, start : start + self.block] for n in self.names])
                if kv.nbytes > self.budget:
                    break
                block_id, self._next_id = self._next_id, self._next_id + 1
                self._ids[key] = block_id
                self._blocks[block_id] = _Block(key, kv)
                self.bytes += kv.nbytes
            chain.append(block_id)
            parent = block_id
        self._touch(chain)
        while self.bytes > self.budget:
            self._evict()

    def _evict(self) -> None:
        _, block = self._blocks.popitem(last=False)
        del self._ids[block.key]
        self.bytes -= block.kv.nbytes

    def stats(self) -> dict:
        return {
            "blocks": len(self._blocks),
            "bytes": self.bytes,
            "budget_bytes": self.budget,
            "queries": self.queries,
            "hit_rate": self.hits / self.queries if self.queries else 0.0,
            "cached_token_rate": (
                self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
            ),
        }
