"""The comparison statistics: the verdict's means against the reported extremes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qwen_deploy.parity.metrics import _log_softmax, compare_logits, merge_metrics
from qwen_deploy.parity.presets import PRESETS


def _rows(n: int = 40, vocab: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.normal(scale=4.0, size=(n, vocab))
    return ref, ref + rng.normal(scale=0.05, size=ref.shape)


def test_means_and_extremes_against_a_direct_computation():
    ref, cand = _rows()
    cand[7] += np.random.default_rng(1).normal(scale=2.0, size=ref.shape[1])  # one bad row
    metrics = compare_logits(ref, cand)
    p, q = _log_softmax(ref), _log_softmax(cand)
    kl = (np.exp(p) * (p - q)).sum(-1)
    rc, cc = ref - ref.mean(-1, keepdims=True), cand - cand.mean(-1, keepdims=True)
    cosine = (rc * cc).sum(-1) / np.linalg.norm(rc, axis=-1) / np.linalg.norm(cc, axis=-1)
    assert metrics["kl_mean"] == pytest.approx(kl.mean()) and metrics["kl_max"] == kl.max()
    assert metrics["cosine_mean"] == pytest.approx(cosine.mean())
    assert metrics["cosine_min"] == pytest.approx(cosine.min())
    assert metrics["worst_row"] == 7
    # one bad row in 40 moves the mean by a 40th of what it moves the extreme
    assert metrics["kl_max"] > 10 * metrics["kl_mean"]


def test_merged_parts_equal_the_whole_and_locate_the_worst_row():
    ref, cand = _rows()
    cand[29] += 3.0 * np.arange(ref.shape[1]) / ref.shape[1]
    whole = compare_logits(ref, cand, atol=0.1, rtol=0.01)
    bounds = [0, 5, 17, 30, 40]
    parts = [
        (compare_logits(ref[a:b], cand[a:b], atol=0.1, rtol=0.01), b - a)
        for a, b in itertools.pairwise(bounds)
    ]
    merged = merge_metrics(parts)
    assert merged == pytest.approx(whole, rel=1e-12)
    assert merged["worst_row"] == whole["worst_row"] == 29


def test_one_extreme_row_does_not_fail_a_quantized_preset_but_a_shift_of_all_rows_does():
    """The INT8 preset judges the mean: a row as far off as the attention-sink row of a larger
    model is reported, a distribution moved on every row fails."""
    preset = PRESETS["int8-weight"]
    ref, cand = _rows(n=200, vocab=2000)
    cand[0] = ref[0] + np.random.default_rng(2).normal(scale=0.6, size=ref.shape[1])
    metrics = preset.measure(ref, cand)
    assert metrics["cosine_min"] < 0.995 and not preset.failures(metrics)
    noisy = ref + np.random.default_rng(3).normal(scale=0.6, size=ref.shape)
    failures = preset.failures(preset.measure(ref, noisy))
    assert any(f.startswith(("mean KL", "mean cosine")) for f in failures), failures
