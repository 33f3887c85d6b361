"""Run an fp16 artifact with float32 compute on CPU.

onnxruntime's CPU kernels round every fp16 intermediate, and a random test model's near-tied
logits flip under that noise; on CPU the fp16 artifact is therefore run with its fp16-rounded
weights widened to float32 (the same numbers the artifact holds, computed at full precision).
GPUs run the artifact as stored.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

FP16, FP32 = TensorProto.FLOAT16, TensorProto.FLOAT


def _widen_types(graph: onnx.GraphProto) -> None:
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == FP16:
            value.type.tensor_type.elem_type = FP32
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == FP16:
                attr.i = FP32
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FP16:
                attr.t.CopyFrom(
                    numpy_helper.from_array(
                        numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name
                    )
                )


def widen_fp16_model(model_path: str | Path, out_dir: str | Path) -> Path:
    """Write a float32-compute copy of the fp16 model at `model_path` into `out_dir`."""
    model = onnx.load(str(model_path), load_external_data=True)
    initializers = []
    for tensor in model.graph.initializer:
        if tensor.data_type == FP16:
            tensor = numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype(np.float32), tensor.name
            )
        initializers.append(tensor)
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    _widen_types(model.graph)
    out = Path(out_dir) / "model_fp32_compute.onnx"
    onnx.save_model(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=out.name + ".data",
        size_threshold=1024,
    )
    return out


def fp32_compute_copy(model_path: str | Path) -> tuple[Path, tempfile.TemporaryDirectory]:
    """A widened copy in a temp folder; keep the returned TemporaryDirectory alive while in use."""
    tmp = tempfile.TemporaryDirectory(prefix="qwen-deploy-fp32-")
    return widen_fp16_model(model_path, tmp.name), tmp
