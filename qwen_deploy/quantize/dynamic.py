"""INT8 weights and per-token INT8 activations on onnxruntime's integer GEMM (int8-dynamic).

Every linear layer but BLOCKWISE_ROLES, the LM head included, becomes MatMulInteger: symmetric
INT8 weights with one scale per output channel, and each activation row (token) quantized at run
time with its own scale, max |x| / 127, as uint8 around the zero point 128. onnxruntime runs
MatMulInteger on MLAS's blocked integer GEMM (VNNI, or AMX where the CPU has it), several times
faster than MatMulNBits once a step holds many rows: a prefill chunk, a batch of decoding rows.
MatMulNBits (int8-weight) stays faster for a single decoding row (docs/DESIGN.md, "Precisions").

Per-row scales keep a row's result independent of the other rows in its step: the integer
products are exact, so a token's logits do not depend on its batch mates or on how its prompt
was chunked (DynamicQuantizeMatMul would share one scale across the whole step). The graph is
smoothed first, as for int8-weight, and the embedding becomes INT8 rows as there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from .linears import Linear
from .rewrite import GraphRewrite
from .smoothing import Smoother
from .weight_only import BLOCK_SIZE, matmul_nbits, quantize_embedding, quantize_rows

ZERO_POINT = 128  # activations as uint8 around it: the u8 x s8 form the integer kernels take
# down_proj reads the MLP's product, whose attention-sink token holds channels hundreds of times
# its others: one scale for that row zeroes the rest of it (real 0.5B, every linear per row:
# worst-row cosine 0.9935, KL 0.18). These stay MatMulNBits, whose scales are per block of 64.
BLOCKWISE_ROLES = ("down_proj",)


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 codes of a [K, N] weight, one scale per output channel: the rows of its
    transpose, as the embedding's (weight_only.quantize_rows).

    Returns (codes int8 [K, N], scales float32 [N]); dequantized weight = codes * scales.
    """
    codes, scales = quantize_rows(np.asarray(weight).T)
    return np.ascontiguousarray(codes.T), scales[:, 0]


class DynamicRows:
    """The run-time quantization of activations, one scale per row: the constants it needs,
    written once per graph."""

    def __init__(self, rw: GraphRewrite, dtype: np.dtype):
        self.rw, self.dtype = rw, np.dtype(dtype)
        self.levels = rw.initializer("int8_dynamic.levels", np.array(127, self.dtype))
        # an all-zero row (padding) gets this scale instead of 0: its codes are 0, not NaN
        self.tiny = rw.initializer("int8_dynamic.tiny", np.array(np.finfo(self.dtype).tiny))
        self.one = rw.initializer("int8_dynamic.one", np.array(1, self.dtype))
        self.zero_point = rw.initializer("int8_dynamic.zero_point", np.array(ZERO_POINT, np.uint8))
        self.last_axis = rw.initializer("int8_dynamic.last_axis", np.array([-1], np.int64))

    def quantize(self, x: str, hint: str) -> tuple[list[onnx.NodeProto], str, str]:
        """Nodes quantizing `x` [..., K] row by row; returns (nodes, uint8 codes, row scales
        [..., 1])."""
        rw = self.rw
        absolute = rw.node("Abs", [x], hint + "/Abs")
        peak = rw.node(
            "ReduceMax", [absolute.output[0], self.last_axis], hint + "/RowMax", keepdims=1
        )
        step = rw.node("Div", [peak.output[0], self.levels], hint + "/RowScale")
        scale = rw.node("Max", [step.output[0], self.tiny], hint + "/RowScaleNonZero")
        scaled = rw.node("Div", [x, scale.output[0]], hint + "/Scaled")
        codes = rw.node(
            "QuantizeLinear", [scaled.output[0], self.one, self.zero_point], hint + "/Codes"
        )
        nodes = [absolute, peak, step, scale, scaled, codes]
        return nodes, codes.output[0], scale.output[0]

    def matmul(
        self, lin: Linear, codes: str, row_scale: str, weight: np.ndarray
    ) -> list[onnx.NodeProto]:
        """`lin` on quantized rows: MatMulInteger, then the column and row scales (and the bias,
        whose Add is removed); the last node writes lin.output."""
        rw, hint = self.rw, lin.weight.removesuffix(".weight")
        w_codes, w_scales = quantize_columns(weight)
        product = rw.node(
            "MatMulInteger",
            [codes, rw.initializer(lin.weight + ".int8", w_codes), self.zero_point],
            hint + "/MatMulInteger",
        )
        to_float = rw.node(
            "Cast",
            [product.output[0]],
            hint + "/Cast",
            to=helper.np_dtype_to_tensor_dtype(self.dtype),
        )
        columns = rw.node(
            "Mul",
            [
                to_float.output[0],
                rw.initializer(lin.weight + ".scale", w_scales.astype(self.dtype)),
            ],
            hint + "/ColumnScale",
        )
        rows = rw.node(
            "Mul",
            [columns.output[0], row_scale],
            hint + "/RowScale",
            outputs=None if lin.bias else [lin.output],
        )
        if not lin.bias:
            return [product, to_float, columns, rows]
        rw.replace(lin.bias_add, [])
        bias = rw.node("Add", [rows.output[0], lin.bias], hint + "/Bias", outputs=[lin.output])
        return [product, to_float, columns, rows, bias]


def quantize_dynamic(
    smoother: Smoother,
    step: Callable[[str], None] = lambda _: None,
    block: int = BLOCK_SIZE,
) -> dict:
    """Rewrite every linear layer (after `smoother.apply`) and the embedding; returns the scheme.
    The layers of a group read one quantization of their shared input; BLOCKWISE_ROLES take
    scales per `block` input channels."""
    rw = smoother.rw
    rows = DynamicRows(rw, smoother.dtype)
    for group in smoother.groups:
        nodes, x = smoother.smoothed_input(group)
        if group.linears[0].role in BLOCKWISE_ROLES:
            for i, lin in enumerate(group.linears):
                step(lin.weight)
                weight = smoother.weight(lin, group)
                matmul = matmul_nbits(rw, lin, x, weight, smoother.dtype, block=block)
                rw.replace(lin.matmul, [*(nodes if i == 0 else []), matmul])
            continue
        quantized, codes, scale = rows.quantize(x, group.hint + "/Int8Rows")
        for i, lin in enumerate(group.linears):
            step(lin.weight)
            matmul = rows.matmul(lin, codes, scale, smoother.weight(lin, group))
            rw.replace(lin.matmul, [*(nodes + quantized if i == 0 else []), *matmul])
    embedded = quantize_embedding(rw, smoother.dtype)
    return {
        "weights": "int8 symmetric, per output channel",
        "activations": "int8 per row (token), quantized at run time",
        "op": "MatMulInteger; " + ", ".join(BLOCKWISE_ROLES) + " com.microsoft.MatMulNBits",
        "bits": 8,
        "block_size": block,
        "layers": len(smoother.linears),
        "lm_head": any(lin.role == "lm_head" for lin in smoother.linears),
        "embedding": "int8 per row" if embedded else "unchanged",
        "smoothing": smoother.summary(),
    }
