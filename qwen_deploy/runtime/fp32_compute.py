"""Run an fp16 artifact with float32 compute on CPU.

onnxruntime's CPU kernels round every fp16 intermediate, and a random test model's near-tied
logits flip under that noise; on CPU the fp16 artifact is therefore run with its fp16-rounded
weights widened to float32 (the same numbers the artifact holds, computed at full precision).
GPUs run the artifact as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
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


@dataclass
class Widened:
    """An fp16 graph retyped to float32 (weights stripped) and its fp16 external weights widened
    in memory, handed to onnxruntime as replacements: no float32 copy of the model on disk (that
    copy took 36 s of a 0.5B model's 45 s load). Keep it alive until the session is built."""

    model: onnx.ModelProto
    folder: Path  # where the artifact's other external data lies
    names: list[str]
    values: list[ort.OrtValue]

    def session(
        self,
        options: ort.SessionOptions,
        providers: list[str],
        disabled_optimizers: list[str] | None = None,
    ) -> ort.InferenceSession:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(self.folder)
        )
        if self.names:
            options.add_external_initializers(self.names, self.values)
        return ort.InferenceSession(
            self.model.SerializeToString(),
            options,
            providers=providers,
            disabled_optimizers=disabled_optimizers or [],
        )


def widen_fp16(model_path: str | Path) -> Widened:
    """The fp16 model at `model_path` as float32 compute: inline tensors widened in the graph,
    external ones widened into OrtValues that replace them when the session loads."""
    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    names, values = [], []
    for tensor in model.graph.initializer:
        if tensor.data_type != FP16:
            continue
        array = numpy_helper.to_array(tensor, str(model_path.parent)).astype(np.float32)
        if tensor.data_location == TensorProto.EXTERNAL:
            tensor.data_type = FP32  # onnxruntime checks name, shape and type of a replacement
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
        else:
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    _widen_types(model.graph)
    return Widened(model, model_path.parent, names, values)
