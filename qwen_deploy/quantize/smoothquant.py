"""INT8 SmoothQuant (W8A8) as QuantizeLinear/DequantizeLinear pairs for TensorRT and onnxruntime.

After smoothing (smoothing.py), as TensorRT's explicit quantization expects: each MatMul's
activation input goes through QuantizeLinear -> DequantizeLinear (per-tensor scale from
calibration, int8 zero point 0), its weight is an INT8 initializer with per-output-channel scales
behind a DequantizeLinear (axis=1), and both DequantizeLinear outputs feed the MatMul.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from .linears import Linear
from .rewrite import GraphRewrite
from .smoothing import Smoother

ROW_CHUNK = 1024


def quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 [K, N] codes and one float32 scale per output channel (column).

    Row chunks bound the float temporaries (a 7B LM head is 2 GB in float32).
    """
    scales = (
        np.max(
            [
                np.abs(weight[a : a + ROW_CHUNK]).max(axis=0)
                for a in range(0, weight.shape[0], ROW_CHUNK)
            ],
            axis=0,
        )
        / 127.0
    )
    safe = np.where(scales > 0, scales, 1.0)
    codes = np.empty(weight.shape, np.int8)
    for a in range(0, weight.shape[0], ROW_CHUNK):
        codes[a : a + ROW_CHUNK] = np.clip(np.rint(weight[a : a + ROW_CHUNK] / safe), -127, 127)
    return codes, scales.astype(np.float32)


def dequantized_weight(
    rw: GraphRewrite, lin: Linear, weight: np.ndarray, scale_dtype: np.dtype = np.float32
) -> onnx.NodeProto:
    """DequantizeLinear of `lin`'s [K, N] weight in symmetric per-output-channel INT8."""
    codes, scales = quantize_per_channel(weight)
    return rw.node(
        "DequantizeLinear",
        [
            rw.initializer(lin.weight + ".int8", codes),
            rw.initializer(lin.weight + ".scale", scales.astype(scale_dtype)),
            rw.initializer(lin.weight + ".zero", np.zeros(scales.shape, np.int8)),
        ],
        lin.weight.removesuffix(".weight") + "/DequantizeWeight",
        axis=1,
    )


def quantize_smoothquant(smoother: Smoother, step: Callable[[str], None] = lambda _: None) -> dict:
    """Rewrite every smoothed linear layer as Q/DQ W8A8 (after `smoother.apply`; the groups it
    kept in floating point keep their MatMul); returns the scheme."""
    rw = smoother.rw
    for group in smoother.groups:
        if not group.quantized:
            for lin in group.linears:
                step(lin.weight)
            continue
        nodes, x = smoother.smoothed_input(group)
        scale = rw.initializer(
            rw.name(group.hint + "/act_scale"),
            np.array(max(smoother.smoothed_absmax(group), 1e-8) / 127.0, smoother.dtype),
        )
        zero = rw.initializer(rw.name(group.hint + "/act_zero"), np.array(0, np.int8))
        for i, lin in enumerate(group.linears):
            # a Q/DQ pair per MatMul (sharing the group's scale), TensorRT's canonical placement:
            # each (Q, DQ, DQ(W), MatMul) unit becomes one INT8 GEMM, and onnxruntime CPU fuses
            # each into MatMulIntegerToFloat (runtime.onnxruntime_backend.disabled_optimizers).
            step(lin.weight)
            name = lin.weight.removesuffix(".weight")
            q = rw.node("QuantizeLinear", [x, scale, zero], name + "/QuantizeInput")
            dq = rw.node("DequantizeLinear", [q.output[0], scale, zero], name + "/DequantizeInput")
            weight = dequantized_weight(rw, lin, smoother.weight(lin, group), smoother.dtype)
            matmul = onnx.helper.make_node(
                "MatMul",
                [dq.output[0], weight.output[0]],
                list(lin.matmul.output),
                name=lin.matmul.name,
            )
            rw.replace(lin.matmul, [*(nodes if i == 0 else []), q, dq, weight, matmul])
    return {
        "weights": "int8 symmetric per output channel (DequantizeLinear axis=1)",
        "activations": "int8 symmetric per tensor, static (QuantizeLinear/DequantizeLinear)",
        "format": "QDQ",
        "zero_point": 0,
        "layers": sum(len(g.linears) for g in smoother.groups if g.quantized),
        "lm_head": any(g.quantized and g.linears[0].role == "lm_head" for g in smoother.groups),
        "smoothing": smoother.summary(),
    }
