"""The onnxruntime backend's KV caches: host arrays and bound (IO-binding, in place for gqa)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from qwen_deploy.errors import QwenDeployError
from qwen_deploy.serve.onnxruntime_backend import GROW_STEP, OnnxRuntimeBackend


@pytest.fixture(scope="module", params=["onnx", "gqa"])
def backend(request, artifact) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(artifact(attention=request.param))


def left_padded(total: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two rows of `total` columns; the second starts with `pad` padding positions."""
    ids = np.random.default_rng(0).integers(0, 150000, (2, total))
    mask = np.ones((2, total), np.int64)
    mask[1, :pad] = 0
    return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@pytest.mark.parametrize("capacity", [None, 12], ids=["host", "bound"])
def test_prefill_then_decode_equals_one_full_pass(backend, capacity):
    total, prompt = 12, 7
    ids, mask, positions = left_padded(total, pad=3)
    full = backend.forward(ids, mask, positions, backend.new_cache(2))
    cache = backend.new_cache(2, capacity=capacity)
    steps = [backend.forward(ids[:, :prompt], mask[:, :prompt], positions[:, :prompt], cache)]
    for t in range(prompt, total):
        steps.append(
            backend.forward(ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1], cache)
        )
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[1:, 3:], full[1:, 3:], atol=1e-4)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[0], full[0], atol=1e-4)
    assert cache.length == total
    if capacity is None:
        spec = backend.manifest.model
        assert {a.shape for a in cache.arrays.values()} == {
            (2, spec.num_kv_heads, total, spec.head_dim)
        }
    else:
        assert cache.arrays == {} and cache.values


def test_bound_in_place_cache_grows_beyond_its_capacity(artifact):
    backend = OnnxRuntimeBackend(artifact(attention="gqa"))
    assert backend.in_place
    total = GROW_STEP + 4
    ids, mask, positions = left_padded(total, pad=0)
    ids, mask, positions = ids[:1], mask[:1], positions[:1]
    host = backend.new_cache(1)
    bound = backend.new_cache(1, capacity=8)
    assert bound.capacity == GROW_STEP
    start = GROW_STEP - 3
    for cache in (host, bound):
        backend.forward(ids[:, :start], mask[:, :start], positions[:, :start], cache)
    for t in range(start, total):
        step = (ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1])
        np.testing.assert_allclose(
            backend.forward(*step, bound), backend.forward(*step, host), atol=1e-4
        )
    assert bound.capacity == 2 * GROW_STEP and bound.length == host.length == total


def test_unknown_or_missing_provider_is_a_clear_error(tiny_artifact):
    with pytest.raises(QwenDeployError, match="provider 'tpu' is not one of cpu, cuda"):
        OnnxRuntimeBackend(tiny_artifact, provider="tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the missing-provider message cannot be shown")
    with pytest.raises(QwenDeployError, match="install onnxruntime-gpu"):
        OnnxRuntimeBackend(tiny_artifact, provider="cuda")
