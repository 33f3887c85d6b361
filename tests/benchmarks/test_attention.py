"""benchmarks/attention.py: both attention graphs compute numpy's causal attention."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.attention import measure, reference


@pytest.mark.parametrize("new", [1, 5])  # a decode step, a prefill chunk
def test_both_graphs_compute_the_reference_attention(new):
    result = measure(context=40, new=new, heads=6, kv_heads=2, dim=16, threads=1, repeats=2)
    assert result["gqa_max_error"] < 1e-5 and result["scatter_max_error"] < 1e-5
    assert result["gqa_ms"] > 0 and result["scatter_ms"] > 0


def test_reference_is_causal_and_uniform_over_equal_keys():
    values = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    q = np.ones((2, 3, 2, 4), np.float32)  # 2 new tokens: positions 3 and 4
    out = reference(q, np.zeros((2, 5, 4), np.float32), values)
    np.testing.assert_allclose(
        out[:, :, 0], np.broadcast_to(values[:, :4].mean(1)[:, None], (2, 3, 4)), rtol=1e-6
    )
    np.testing.assert_allclose(
        out[:, :, 1], np.broadcast_to(values.mean(1)[:, None], (2, 3, 4)), rtol=1e-6
    )
