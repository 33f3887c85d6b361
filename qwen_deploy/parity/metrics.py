"""Logit comparison metrics between a reference and a candidate (numpy only).

The verdicts (parity presets, quantize gates) bound statistics that mean the same thing on every
model: the mean per-row KL and centered cosine, the top-1 agreement, and for the float presets
every logit's error against float rounding. The extreme rows (smallest cosine, largest KL) grow
with a model's rows, vocabulary and prompt set; they are reported, with the row that holds them,
never judged (docs/DESIGN.md, "Parity presets").
"""

from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(
    reference: np.ndarray, candidate: np.ndarray, atol: float | None = None, rtol: float = 0.0
) -> dict[str, float]:
    """Metrics over rows of [..., vocab] logits.

    Per row: the cosine similarity of the logits with the row's mean removed (softmax ignores a
    constant added to a row: on the real model INT8 shifts the row after the attention-sink token
    by ~0.13 as a whole, which took its raw cosine to 0.9975 while its distribution moved by KL
    0.007), and KL(reference || candidate) of the softmax distributions in nats.
    cosine_mean/kl_mean: their means over rows; cosine_min/kl_max: the extremes, and worst_row
    the index of the row with the largest KL; top1: fraction of rows whose argmax agrees;
    max_abs/mean_abs: absolute logit error. With `atol`, also tol_ratio: the largest
    |candidate - reference| / (atol + rtol * |reference|) over all logits, the combined bound of
    numpy's allclose and torch.testing (<= 1: every logit within it).
    """
    ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    cand = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {cand.shape}")
    diff = np.abs(ref - cand)
    ref_c = ref - ref.mean(axis=-1, keepdims=True)
    cand_c = cand - cand.mean(axis=-1, keepdims=True)
    norms = np.linalg.norm(ref_c, axis=-1) * np.linalg.norm(cand_c, axis=-1)
    cosine = (ref_c * cand_c).sum(-1) / np.maximum(norms, 1e-30)
    log_p, log_q = _log_softmax(ref), _log_softmax(cand)
    kl = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)
    metrics = {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "top1": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
        "cosine_mean": float(cosine.mean()),
        "kl_mean": float(kl.mean()),
        "cosine_min": float(cosine.min()),
        "kl_max": float(kl.max()),
        "worst_row": int(kl.argmax()),
    }
    if atol is not None:
        metrics["tol_ratio"] = float((diff / (atol + rtol * np.abs(ref))).max())
    return metrics


def merge_metrics(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """compare_logits results of consecutive disjoint row sets (with their row counts) as one:
    the worst max_abs, tol_ratio and extremes, worst_row counted over all rows in order; the
    means and top-1 weighted by rows."""
    rows = np.array([n for _, n in parts], dtype=np.float64)

    def weighted(key: str) -> float:
        return float(np.average([m[key] for m, _ in parts], weights=rows))

    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
    worst = max(range(len(parts)), key=lambda i: parts[i][0]["kl_max"])
    merged = {
        "max_abs": max(m["max_abs"] for m, _ in parts),
        "mean_abs": weighted("mean_abs"),
        "top1": weighted("top1"),
        "cosine_mean": weighted("cosine_mean"),
        "kl_mean": weighted("kl_mean"),
        "cosine_min": min(m["cosine_min"] for m, _ in parts),
        "kl_max": parts[worst][0]["kl_max"],
        "worst_row": int(starts[worst]) + parts[worst][0]["worst_row"],
    }
    if all("tol_ratio" in m for m, _ in parts):
        merged["tol_ratio"] = max(m["tol_ratio"] for m, _ in parts)
    return merged
