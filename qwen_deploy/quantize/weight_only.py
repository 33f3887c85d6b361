"""Weight-only quantization (INT8, INT4) in the form onnxruntime runs fastest on CPU.

Every linear layer, the LM head included, becomes com.microsoft MatMulNBits with bits=8:
symmetric INT8 codes (stored as uint8 around the implicit zero point 128), one scale per output
channel and block of BLOCK_SIZE input channels, the bias folded into the node. Measured on a
Qwen2-0.5B shape (benchmarks/quantize.py --candidates): accuracy_level=4, which quantizes the
activation per block and runs onnxruntime's INT8 dot-product kernels, decodes ~25x faster than the
fp32-compute level 0; DequantizeLinear + MatMul is rewritten by onnxruntime into the same kernel;
DynamicQuantizeMatMul is as fast but quantizes each activation row with one scale, the form
activation outliers hurt most. Per-channel is the block_size = K limit, which MatMulNBits does
not allow (power-of-two blocks), so the scales are blockwise (finer, ~6% more bytes): 64 is the
measured middle between speed (larger) and accuracy (smaller).
Because the kernel quantizes activations, the graph is smoothed first (smoothing.py), which keeps
outlier channels from costing accuracy. The embedding table becomes INT8 rows with a per-row
scale (Gather of both, then Mul): the decoder reads one row per token, so it costs no speed and
takes the 0.5B artifact from ~41% to ~26% of the fp32 size.

INT4 (int4-weight) is the same rewrite with bits=4 for the transformer's linears: asymmetric codes
per block of input channels (INT4_BLOCK_SIZES, 32 by default), a scale and a uint4 zero point each
(a float zero point would represent more grids exactly, but onnxruntime then leaves its integer
kernel: 65x slower per MatMul, measured), the block's grid chosen among shrunk min-max ranges by
squared error (SHRINK: clipping a block's outlier costs less than coarsening its other 31 values),
each also with its scale refit to the codes it gave. Packed as MatMulNBits expects: two codes per
byte, the lower K index in the low nibble; zero points two per byte, the even block in the low
nibble, ceil(blocks / 2) bytes per output channel. The LM head, whose error reaches every logit,
v_proj and down_proj stay INT8 (INT8_ROLES), and so does the embedding. With calibration rows of
each layer's input, the codes are GPTQ's instead of the nearest (gptq.py; `quantize --gptq`), on
grids searched without the refit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
from onnx import helper

from ..contract import MS_DOMAIN
from .gptq import gptq_int4, hessian
from .linears import EMBEDDING, Linear
from .rewrite import GraphRewrite
from .smoothing import Smoother

# INT8 input channels per scale; --block-size of the INT8 modes: 128 prefills faster, but only
# up to 64 does onnxruntime's CPU kernel compute each row as it would alone (batch invariance)
BLOCK_SIZE = 64
INT8_BLOCK_SIZES = (64, 128)
# --block-size of int4-weight: larger blocks decode faster, lose more; the default 32 is
# onnxruntime's quantizer and GPTQ/AWQ default, llama.cpp's Q4 sub-blocks
INT4_BLOCK_SIZES = (32, 64, 128)
# int4-weight keeps these INT8, as llama.cpp's Q4_K_M keeps its output layer, attn_v and ffn_down
# at 6 bits: on the real 0.5B model all-INT4 linears (LM head aside) lost top-1 0.906 and +5.8%
# perplexity, with v_proj and down_proj INT8 too 0.936 and +1.1% (artifact 551 vs 508 MB)
INT8_ROLES = ("lm_head", "v_proj", "down_proj")
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # candidate fractions of a block's min-max range
ACCURACY_LEVEL = 4  # int8 activations in the kernel
COLUMN_CHUNK = 4096  # output channels quantized at once: bounds the fp32 temporaries


def quantize_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 codes of a [K, N] weight in MatMulNBits layout.

    Returns (codes uint8 [N, ceil(K/block), block] holding q + 128, scales float32 [N, blocks]);
    dequantized weight^T = (codes - 128) * scales, K zero-padded to whole blocks.
    """
    k, n = weight.shape
    blocks = -(-k // block)
    codes = np.empty((n, blocks, block), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    for a in range(0, n, COLUMN_CHUNK):
        b = min(n, a + COLUMN_CHUNK)
        w = np.zeros((b - a, blocks * block), np.float32)
        w[:, :k] = np.asarray(weight[:, a:b], np.float32).T
        w = w.reshape(b - a, blocks, block)
        s = np.abs(w).max(axis=-1) / 127.0
        q = np.rint(w / np.where(s > 0, s, 1.0)[..., None])
        codes[a:b] = (np.clip(q, -127, 127) + 128).astype(np.uint8)
        scales[a:b] = s
    return codes, scales


def int4_grid(w: np.ndarray, refit: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scale, uint4 zero point) of each block along the last axis of `w`: the least squared
    error among SHRINK fractions of the min-max range (shrunk about its middle), each tried as
    found and, with `refit`, with its scale refit by least squares to the codes it gave (as
    llama.cpp's K-quants refit theirs)."""
    lo, hi = w.min(axis=-1), w.max(axis=-1)
    best = np.full(lo.shape, np.inf, np.float32)
    scales = np.ones(lo.shape, np.float32)
    zeros = np.zeros(lo.shape, np.uint8)

    def consider(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Keep (s, z) where it beats the best grid so far; returns its centered codes."""
        q = _centered_codes(w, s, z)
        error = np.square(q * s[..., None] - w).sum(axis=-1)
        better = error < best
        best[better], scales[better], zeros[better] = error[better], s[better], z[better]
        return q

    for fraction in SHRINK:
        span = (hi - lo) * fraction
        s = np.where(span > 0, span / 15.0, 1.0)
        z = np.clip(np.rint(-(lo + (hi - lo - span) / 2) / s), 0, 15)
        q = consider(s, z)
        if refit:  # the scale minimizing |q s - w| for the codes q this range gave
            num, den = (q * w).sum(axis=-1), (q * q).sum(axis=-1)
            fit = num / np.where(den > 0, den, 1.0)
            consider(np.where((num > 0) & (den > 0), fit, s), z)
    return scales, zeros


def _centered_codes(w: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The nearest 4-bit codes of `w` on the grid (s, z) of each block, minus the zero point."""
    return np.clip(np.rint(w / s[..., None]) + z[..., None], 0, 15) - z[..., None]


def quantize_blocks_int4(
    weight: np.ndarray, block: int, h: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit codes of a [K, N] weight in MatMulNBits order, unpacked.

    Returns (codes uint8 [N, blocks, block] in 0..15, scales float32 [N, blocks], zero points
    uint8 [N, blocks]); dequantized weight^T = (codes - zero point) * scale, K zero-padded to
    whole blocks. Each block's grid comes from int4_grid; with the input's Hessian `h` the codes
    are GPTQ's (gptq.py), else the nearest.
    """
    if h is not None:
        # no refit: it fits a block's scale to the weights as they are when the block starts,
        # and GPTQ moves them after (real 0.5B, block 128: perplexity +5.7% with it, +2.6%)
        return gptq_int4(np.asarray(weight, np.float32), h, block, _gptq_grid)
    k, n = weight.shape
    blocks = -(-k // block)
    codes = np.empty((n, blocks, block), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    zeros = np.empty((n, blocks), np.uint8)

    def columns(a: int) -> None:
        b = min(n, a + COLUMN_CHUNK // 4)
        w = np.zeros((b - a, blocks * block), np.float32)
        w[:, :k] = np.asarray(weight[:, a:b], np.float32).T
        w = w.reshape(b - a, blocks, block)
        s, z = int4_grid(w)
        codes[a:b] = np.clip(np.rint(w / s[..., None]) + z[..., None], 0, 15)
        scales[a:b], zeros[a:b] = s, z

    # the grid search is elementwise numpy work, which releases the GIL: one chunk per core
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(columns, range(0, n, COLUMN_CHUNK // 4)))
    return codes, scales, zeros


def _gptq_grid(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return int4_grid(w.T, refit=False)  # w: [block, N], a block's input channels first


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (uint8 0..15) two per byte along the last axis, the even index in the low
    nibble; an odd last axis is padded with 0."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 rows of an embedding table: (codes int8 [V, H], scales float32 [V, 1])."""
    codes = np.empty(table.shape, np.int8)
    scales = np.empty((table.shape[0], 1), np.float32)
    step = max(1, (64 << 20) // max(table.shape[1] * 4, 1))
    for a in range(0, table.shape[0], step):
        rows = np.asarray(table[a : a + step], np.float32)
        s = np.abs(rows).max(axis=1, keepdims=True) / 127.0
        codes[a : a + step] = np.clip(np.rint(rows / np.where(s > 0, s, 1.0)), -127, 127)
        scales[a : a + step] = s
    return codes, scales


def matmul_nbits(
    rw: GraphRewrite,
    lin: Linear,
    x: str,
    weight: np.ndarray,
    scale_dtype: np.dtype = np.float32,
    block: int = BLOCK_SIZE,
    accuracy_level: int = ACCURACY_LEVEL,
    bits: int = 8,
    h: np.ndarray | None = None,
) -> onnx.NodeProto:
    """A MatMulNBits node (bits 8: symmetric; 4: asymmetric, packed) computing `lin` on `x` from
    its [K, N] `weight`, the bias folded in (its Add is removed); the caller puts the node where
    lin.matmul was."""
    (node,) = fused_matmul_nbits(
        rw, [lin], x, lambda _: weight, scale_dtype, block, accuracy_level, bits, h
    )
    return node


def fused_matmul_nbits(
    rw: GraphRewrite,
    lins: list[Linear],
    x: str,
    weight: Callable[[Linear], np.ndarray],
    scale_dtype: np.dtype = np.float32,
    block: int = BLOCK_SIZE,
    accuracy_level: int = ACCURACY_LEVEL,
    bits: int = 8,
    h: np.ndarray | None = None,
) -> list[onnx.NodeProto]:
    """One MatMulNBits computing every linear of `lins` on their shared input `x` (q/k/v, or
    gate/up), their [K, N] weights (`weight(lin)`, quantized one at a time) side by side, then a
    Split into their outputs (none for a single linear); biases folded in, their Adds removed.
    The kernel computes each output column on its own, so the results equal separate nodes' bit
    for bit, while the input is read and quantized once and one kernel runs instead of several."""
    codes, scales, zeros, widths = [], [], [], []
    for lin in lins:
        w = weight(lin)
        widths.append(w.shape[1])
        if bits == 8:
            c, s = quantize_blocks(w, block)
        else:
            c, s, z = quantize_blocks_int4(w, block, h)
            c, z = pack_nibbles(c), pack_nibbles(z).reshape(-1)
            zeros.append(z)
        codes.append(c)
        scales.append(s.astype(scale_dtype))
    name = _fused_name(lins)
    inputs = [
        x,
        rw.initializer(f"{name}.weight.int{bits}", np.concatenate(codes)),
        rw.initializer(name + ".weight.scale", np.concatenate(scales)),
    ]
    if zeros:
        inputs.append(rw.initializer(name + ".weight.zero_point", np.concatenate(zeros)))
    bias = _fused_bias(rw, lins, widths, name)
    if bias:
        inputs += [""] * (5 - len(inputs)) + [bias]
    node = rw.node(
        "MatMulNBits",
        inputs,
        name + "/MatMulNBits",
        outputs=[lins[0].output] if len(lins) == 1 else None,
        domain=MS_DOMAIN,
        K=lins[0].shape[0],
        N=sum(widths),
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    if len(lins) == 1:
        return [node]
    split = rw.initializer(name + ".split", np.array(widths, np.int64))
    outputs = [lin.output for lin in lins]
    return [node, rw.node("Split", [node.output[0], split], name + "/Split", outputs, axis=-1)]


def _fused_name(lins: list[Linear]) -> str:
    """The name of linears computed as one: a single linear's own (model.layers.0.mlp.up_proj),
    siblings' joined (q_proj, k_proj -> model.layers.0.self_attn.q_k_proj)."""
    prefix = lins[0].weight.removesuffix(".weight")
    if len(lins) == 1:
        return prefix
    roles = "_".join(lin.role.removesuffix("_proj") for lin in lins)
    return f"{prefix.rsplit('.', 1)[0]}.{roles}_proj"


def _fused_bias(rw: GraphRewrite, lins: list[Linear], widths: list[int], name: str) -> str | None:
    """The linears' biases side by side (zeros for a linear without one; a single linear's own),
    None when none has one; their Adds are removed."""
    if not any(lin.bias for lin in lins):
        return None
    for lin in lins:
        if lin.bias:
            rw.replace(lin.bias_add, [])
    if len(lins) == 1:
        return lins[0].bias
    parts = [rw.source.array(lin.bias) if lin.bias else None for lin in lins]
    dtype = next(p.dtype for p in parts if p is not None)
    bias = [np.zeros(n, dtype) if p is None else p for p, n in zip(parts, widths, strict=True)]
    return rw.initializer(name + ".bias", np.concatenate(bias))


def quantize_weight_only(
    smoother: Smoother,
    step: Callable[[str], None] = lambda _: None,
    bits: int = 8,
    rows: dict[str, np.ndarray] | None = None,
    block: int = BLOCK_SIZE,
) -> dict:
    """Rewrite every linear layer (after `smoother.apply`) and the embedding; returns the scheme.
    bits 4: INT4 but for INT8_ROLES, GPTQ-rounded where `rows` has calibration inputs of the
    layer. `block`: input channels per scale of the `bits`-wide weights (the caller's choice among
    INT4_BLOCK_SIZES or INT8_BLOCK_SIZES); int4-weight's INT8 roles keep BLOCK_SIZE."""
    rw = smoother.rw
    rows = rows or {}
    for group in smoother.groups:
        nodes, x = smoother.smoothed_input(group)
        h = None
        if bits == 4 and group.input in rows:
            smooth = group.smooth if group.smooth is not None else 1.0
            h = hessian(rows[group.input] / smooth)
        kernels: dict[tuple[int, int], list[Linear]] = {}  # (bits, block): linears fused
        for lin in group.linears:
            if bits == 4 and lin.role not in INT8_ROLES:
                kernels.setdefault((4, block), []).append(lin)
            else:
                kernels.setdefault((8, BLOCK_SIZE if bits == 4 else block), []).append(lin)

        def weight(lin: Linear, group=group) -> np.ndarray:
            step(lin.weight)
            return smoother.weight(lin, group)

        for (b, size), lins in kernels.items():
            nodes += fused_matmul_nbits(
                rw, lins, x, weight, smoother.dtype, size, bits=b, h=h if b == 4 else None
            )
        rw.replace(group.linears[0].matmul, nodes)
        for lin in group.linears[1:]:
            rw.replace(lin.matmul, [])
    embedded = quantize_embedding(rw, smoother.dtype)
    head = any(lin.role == "lm_head" for lin in smoother.linears)
    scheme = {
        "weights": "int8 symmetric, per output channel and block of input channels",
        "op": "com.microsoft.MatMulNBits",
        "bits": 8,
        "block_size": block,
        "accuracy_level": ACCURACY_LEVEL,
        "layers": len(smoother.linears),
        "lm_head": head,
        "embedding": "int8 per row" if embedded else "unchanged",
        "smoothing": smoother.summary(),
    }
    if bits == 4:
        scheme |= {
            "weights": "int4 asymmetric (uint4 zero point, range searched), per output channel "
            "and block of input channels",
            "bits": 4,
            "lm_head": f"int8, block {BLOCK_SIZE}" if head else False,
            "int8_roles": list(INT8_ROLES),
            "rounding": "gptq" if rows else "nearest",
        }
    return scheme


def quantize_embedding(rw: GraphRewrite, float_dtype: np.dtype) -> bool:
    gathers = [n for n in rw.model.graph.node if n.op_type == "Gather" and n.input[0] == EMBEDDING]
    if len(gathers) != 1:
        return False
    gather = gathers[0]
    codes, scales = quantize_rows(rw.source.array(EMBEDDING))
    ids = gather.input[1]
    rows = rw.node("Gather", [rw.initializer(EMBEDDING + ".int8", codes), ids], "embed/GatherInt8")
    row_scales = rw.node(
        "Gather",
        [rw.initializer(EMBEDDING + ".scale", scales.astype(float_dtype)), ids],
        "embed/GatherScale",
    )
    as_float = rw.node(
        "Cast",
        [rows.output[0]],
        "embed/Cast",
        to=helper.np_dtype_to_tensor_dtype(np.dtype(float_dtype)),
    )
    scaled = rw.node(
        "Mul", [as_float.output[0], row_scales.output[0]], "embed/Scale", outputs=[gather.output[0]]
    )
    rw.replace(gather, [rows, row_scales, as_float, scaled])
    return True
