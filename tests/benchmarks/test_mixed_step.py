"""benchmarks/mixed_step.py: the variants it times compute the same logits, timed per variant."""

from __future__ import annotations

from benchmarks.mixed_step import measure
from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend


def test_the_mixed_step_it_times_equals_the_separate_forwards(artifact):
    backend = OnnxRuntimeBackend(artifact(attention="gqa"), threads=1)
    results = measure(backend, rows=2, chunks=[2, 5], context=6, rounds=2)
    assert [(r["rows"], r["chunk"]) for r in results] == [(2, 2), (2, 5)]
    for r in results:
        assert r["max_difference"] == 0.0
        assert r["decode_ms"] > 0 and r["separate_ms"] > 0 and r["mixed_ms"] > 0
        assert r["mixed_over_decode"] == r["mixed_ms"] / r["decode_ms"]
