"""Logit comparison metrics between a reference and a candidate (numpy only)."""

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

    max_abs/mean_abs: absolute logit error; cosine: the smallest per-row cosine similarity of
    the logits with each row's mean removed (softmax ignores a constant added to a row: on the
    real model INT8 shifts the row after the attention-sink token by ~0.13 as a whole, which took
    its raw cosine to 0.9975 while its distribution moved by KL 0.007);
    top1: fraction of rows whose argmax agrees; kl: the largest per-row KL(reference || candidate)
    of the softmax distributions, in nats. With `atol`, also tol_ratio: the largest
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
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    metrics = {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "cosine": float(cosine.min()),
        "top1": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
        "kl": float(max(kl.max(), 0.0)),
    }
    if atol is not None:
        metrics["tol_ratio"] = float((diff / (atol + rtol * np.abs(ref))).max())
    return metrics


def merge_metrics(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """compare_logits results of disjoint row sets (with their row counts) as one: the worst
    max_abs, tol_ratio, cosine and KL; mean_abs and top-1 weighted by rows."""
    rows = np.array([n for _, n in parts], dtype=np.float64)

    def weighted(key: str) -> float:
        return float(np.average([m[key] for m, _ in parts], weights=rows))

    merged = {
        "max_abs": max(m["max_abs"] for m, _ in parts),
        "mean_abs": weighted("mean_abs"),
        "cosine": min(m["cosine"] for m, _ in parts),
        "top1": weighted("top1"),
        "kl": max(m["kl"] for m, _ in parts),
    }
    if all("tol_ratio" in m for m, _ in parts):
        merged["tol_ratio"] = max(m["tol_ratio"] for m, _ in parts)
    return merged
