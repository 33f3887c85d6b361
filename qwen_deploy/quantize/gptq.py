"""GPTQ for the INT4 blocks: each input channel's rounding error is compensated on the channels not
yet quantized, weighted by the layer's input statistics (Frantar et al., 2022, "GPTQ").

Round-to-nearest minimizes |W - Q| per weight; GPTQ minimizes the layer's output error
|X W - X Q| over calibration inputs X, through the inverse Hessian H^-1 of that error
(H = X^T X): quantizing input channel k moves the channels after it by the error times
H^-1's row k (Cholesky form, lazy updates in blocks of UPDATE_BLOCK channels). Block parameters
(scale, zero point) are chosen, by the same range search as without GPTQ, when the first channel
of a block is reached, from the weights as updated so far.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BlockParams = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

GPTQ_TOKENS = 4096  # calibration rows per layer (real 0.5B: perplexity +2.1% with 1024, +1.8%)
DAMP = 0.01  # of the mean diagonal, added to H: keeps it invertible with few or dead channels
UPDATE_BLOCK = 128  # input channels updated lazily at once (a multiple of the INT4 block)


def hessian(rows: np.ndarray) -> np.ndarray:
    """H = X^T X / n (float64 [K, K]) of calibration input rows X [n, K]."""
    x = np.asarray(rows, np.float64)
    return x.T @ x / max(len(x), 1)


def inverse_cholesky(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U upper triangular with U^T U = (H + damping)^-1, dead channel mask): channels calibration
    never saw are quantized freely (their weights meet only zero inputs)."""
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMP * np.mean(np.diag(h))
    lower = np.linalg.cholesky(np.linalg.inv(h))
    return lower.T.astype(np.float32), dead


def gptq_int4(
    weight: np.ndarray,
    h: np.ndarray,
    block: int,
    block_params: BlockParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """INT4 codes of a [K, N] weight (rows: input channels) in MatMulNBits order, GPTQ-rounded.

    `block_params(w [block, N]) -> (scales [N], zero points [N])` chooses a block's grid. Returns
    (codes uint8 [N, blocks, block], scales float32 [N, blocks], zero points uint8 [N, blocks]),
    K zero-padded to whole blocks (the padding is quantized exactly, as zeros).
    """
    k, n = weight.shape
    blocks = -(-k // block)
    w = np.zeros((blocks * block, n), np.float32)
    w[:k] = weight
    hp = np.zeros((blocks * block,) * 2)
    hp[:k, :k] = h
    upper, dead = inverse_cholesky(hp)
    w[dead] = 0.0
    codes = np.empty((blocks * block, n), np.uint8)
    scales = np.empty((blocks, n), np.float32)
    zeros = np.empty((blocks, n), np.uint8)
    step = max(UPDATE_BLOCK // block, 1) * block
    for a in range(0, len(w), step):
        b = min(a + step, len(w))
        errors = np.empty((b - a, n), np.float32)
        for i in range(a, b):
            if i % block == 0:
                s, z = block_params(w[i : i + block])
                scales[i // block], zeros[i // block] = s, z
            s, z = scales[i // block], zeros[i // block]
            q = np.clip(np.rint(w[i] / s) + z, 0, 15)
            codes[i] = q
            err = (w[i] - (q - z) * s) / upper[i, i]
            w[i + 1 : b] -= np.outer(upper[i, i + 1 : b], err)
            errors[i - a] = err
        w[b:] -= upper[a:b, b:].T @ errors
    codes = codes.reshape(blocks, block, n).transpose(2, 0, 1)
    return np.ascontiguousarray(codes), scales.T.copy(), zeros.T.copy()
