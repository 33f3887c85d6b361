"""The prefix cache: whole blocks found by their tokens, least recently used evicted first."""

from __future__ import annotations

import numpy as np

from qwen_deploy.runtime.prefix_cache import PrefixCache

NAMES = ["past.0.key", "past.0.value"]


def kv(tokens: list[int]) -> dict[str, np.ndarray]:
    """Cache arrays whose every position holds its token id (key) and its negative (value)."""
    row = np.array(tokens, np.float32)[None, None, :, None] * np.ones((1, 2, 1, 3), np.float32)
    return {"past.0.key": row, "past.0.value": -row}


def test_lookup_returns_the_longest_cached_prefix_in_whole_blocks():
    cache = PrefixCache(NAMES, budget_bytes=2**20, block=4)
    prompt = list(range(100, 111))  # 11 tokens: two whole blocks
    cache.insert(prompt, kv(prompt))
    assert cache.stats()["blocks"] == 2
    length, arrays = cache.lookup([*prompt[:9], 7, 7, 7], limit=10)
    assert length == 8
    np.testing.assert_array_equal(arrays["past.0.key"], kv(prompt[:8])["past.0.key"])
    np.testing.assert_array_equal(arrays["past.0.value"], kv(prompt[:8])["past.0.value"])
    assert cache.lookup(prompt, limit=7)[0] == 4  # the limit holds
    assert cache.lookup([1, *prompt], limit=12) == (0, None)  # a prefix, not a substring
    assert cache.stats()["hit_rate"] == 2 / 3


def test_a_block_is_keyed_by_everything_before_it():
    cache = PrefixCache(NAMES, budget_bytes=2**20, block=2)
    cache.insert([1, 2, 3, 4], kv([1, 2, 3, 4]))
    assert cache.lookup([9, 9, 3, 4], limit=4) == (0, None)  # same block, other prefix


def test_eviction_keeps_the_budget_and_drops_the_least_recent_leaves_first():
    block_bytes = 2 * 2 * 4 * 3 * 4  # names x heads x tokens x head dim x float32
    cache = PrefixCache(NAMES, budget_bytes=3 * block_bytes, block=4)
    a, b = list(range(8)), [*range(4), *range(50, 54)]  # share their first block
    cache.insert(a, kv(a))
    cache.insert(b, kv(b))  # 3 blocks: the shared one, a's second, b's second
    assert cache.bytes == 3 * block_bytes
    cache.lookup(a, limit=8)  # a's chain is now the most recent
    c = list(range(200, 204))
    cache.insert(c, kv(c))  # over budget: b's leaf goes, not the shared block it extends
    assert cache.bytes <= 3 * block_bytes
    assert cache.lookup(a, limit=8)[0] == 8
    assert cache.lookup(b, limit=8)[0] == 4
    assert cache.lookup(c, limit=4)[0] == 4
