"""benchmarks/attention_decode.py: both decode-attention graphs compute numpy's attention."""

from __future__ import annotations

import numpy as np

from benchmarks.attention_decode import measure, reference


def test_both_graphs_compute_the_reference_attention():
    result = measure(context=40, heads=6, kv_heads=2, dim=16, threads=1, repeats=2)
    assert result["gqa_max_error"] < 1e-5 and result["scatter_max_error"] < 1e-5
    assert result["gqa_ms"] > 0 and result["scatter_ms"] > 0


def test_reference_attends_uniformly_over_equal_keys():
    values = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    out = reference(np.ones((2, 3, 4), np.float32), np.zeros((2, 5, 4), np.float32), values)
    np.testing.assert_allclose(out, np.broadcast_to(values.mean(1)[:, None], (2, 3, 4)), rtol=1e-6)
