"""Run an fp16 artifact with float32 compute on CPU, its weights kept as fp16 in memory.

onnxruntime's CPU kernels round every fp16 intermediate (the real 0.5B model fails the fp16 preset
that way: max abs 0.17, KL 1.3e-3), and its CPU fp16 path replaces every weight by a float32 copy
at load. Here the graph computes in float32 and each fp16 weight stays where onnxruntime maps it
from the data file; a Cast widens it just before its one use, in column slices for the large
ones, so the transient float32 copies stay small. Same numbers as a float32 copy of the weights
(the Cast is exact), at the memory of the fp16 file (real 0.5B: peak RSS 1.15x the artifact,
against 4.6x for a widened copy) and, since every step widens the weights again, at about 0.3x
an fp32 artifact's decode speed: CPU users who want speed export fp32 or int8-weight. GPUs run the
artifact as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FP16, FP32 = TensorProto.FLOAT16, TensorProto.FLOAT
SLICE_ELEMENTS = 1 << 24  # a MatMul weight larger than this is widened in column slices
# both would turn the run-time Casts of weights back into float32 copies at load
KEEP_CASTS = ["ConstantFolding", "FuseFp16InitializerToFp32NodeTransformer"]


@dataclass
class Graph:
    """A graph whose external data lies in `folder`, loaded without writing it anywhere."""

    model: onnx.ModelProto
    folder: Path
    runtime_casts: bool = False  # fp32_compute's graph: keep its Casts, plan memory per node

    def __post_init__(self) -> None:
        """`folder` becomes the folder the external data really lies in, each location its
        file's name there: onnxruntime follows links and refuses data outside the folder it is
        given, and model caches link files to blobs kept (and named) elsewhere. Data in several
        folders stays as it is (onnxruntime's error then names the file)."""
        entries = [
            entry
            for tensor in _tensors(self.model.graph)
            if tensor.data_location == TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        ]
        targets = {e.value: (self.folder / e.value).resolve() for e in entries}
        folders = {target.parent for target in targets.values()}
        if len(folders) == 1:
            for entry in entries:
                entry.value = targets[entry.value].name
            self.folder = folders.pop()

    def session(
        self,
        options: ort.SessionOptions,
        providers: list[str],
        disabled_optimizers: list[str] | None = None,
    ) -> ort.InferenceSession:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(self.folder)
        )
        disabled = list(disabled_optimizers or [])
        if self.runtime_casts:
            disabled += KEEP_CASTS
            # a memory pattern plans every intermediate of a run at once: every widened weight
            options.enable_mem_pattern = False
        return ort.InferenceSession(
            self.model.SerializeToString(),
            options,
            providers=providers,
            disabled_optimizers=disabled,
        )


def _tensors(graph: onnx.GraphProto):
    """The initializers of `graph` and of the graphs inside its nodes (an If's branches)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _tensors(sub)


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


def _int64(graph: onnx.GraphProto, name: str, value: int) -> str:
    graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    return name


class _Casts:
    """Builds the Casts. They go first in the node list: onnxruntime's default order emits a
    node's lower-numbered inputs last, so each Cast then runs right before its consumer."""

    def __init__(self, graph: onnx.GraphProto, weights: dict[str, TensorProto]):
        self.graph, self.weights = graph, weights
        self.casts: list[onnx.NodeProto] = []
        self.widened: dict[str, str] = {}

    def cast(self, source: str, target: str) -> None:
        self.casts.append(helper.make_node("Cast", [source], [target], to=FP32))

    def widened_name(self, name: str) -> str:
        """The float32 copy of weight `name`, shared by its consumers."""
        if name not in self.widened:
            self.widened[name] = f"{name}/fp32"
            self.cast(name, self.widened[name])
        return self.widened[name]

    def widened_constant(self, name: str, folder: Path) -> str:
        """A float32 initializer holding weight `name`, read from the data file now."""
        if name not in self.widened:
            wide = numpy_helper.to_array(self.weights[name], base_dir=str(folder))
            self.widened[name] = f"{name}/fp32"
            self.graph.initializer.append(
                numpy_helper.from_array(wide.astype(np.float32), self.widened[name])
            )
        return self.widened[name]

    def sliced_matmul(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """MatMul(x, W) as the Concat of MatMuls over column slices of W, each widened alone."""
        name = node.input[1]
        columns = self.weights[name].dims[1]
        parts = -(-int(np.prod(self.weights[name].dims)) // SLICE_ELEMENTS)
        step = -(-columns // parts)
        axis = _int64(self.graph, f"{name}/axis", 1)
        nodes, outputs = [], []
        for i, start in enumerate(range(0, columns, step)):
            part = f"{name}/{i}"
            begin = _int64(self.graph, f"{part}/begin", start)
            end = _int64(self.graph, f"{part}/end", min(columns, start + step))
            self.casts.append(helper.make_node("Slice", [name, begin, end, axis], [part]))
            self.cast(part, f"{part}/fp32")
            outputs.append(f"{node.output[0]}/{i}")
            nodes.append(helper.make_node("MatMul", [node.input[0], f"{part}/fp32"], [outputs[-1]]))
        nodes.append(helper.make_node("Concat", outputs, [node.output[0]], axis=-1))
        return nodes


def fp32_compute(model_path: str | Path) -> Graph:
    """The fp16 model at `model_path` computing in float32: inline fp16 tensors widened in the
    graph, external ones (the weights) cast where they are used."""
    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    weights = {}
    for tensor in graph.initializer:
        if tensor.data_type != FP16:
            continue
        if tensor.data_location == TensorProto.EXTERNAL:
            weights[tensor.name] = tensor
        else:
            tensor.CopyFrom(
                numpy_helper.from_array(
                    numpy_helper.to_array(tensor).astype(np.float32), tensor.name
                )
            )
    _widen_types(graph)
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    casts, nodes = _Casts(graph, weights), []
    for node in graph.node:
        first = node.input[0] if node.input else ""
        second = node.input[1] if len(node.input) > 1 else ""
        if node.op_type == "Gather" and first in weights and uses[first] == 1:
            # gather the fp16 rows, then widen only those
            rows = node.output[0]
            node.output[0] = f"{rows}/fp16"
            nodes += [node, helper.make_node("Cast", [f"{rows}/fp16"], [rows], to=FP32)]
        elif node.op_type == "MatMulNBits":
            # its scales (and bias) must be constants: onnxruntime packs them with the codes at
            # load, and computes zeros from scales a Cast makes at run time
            for i in range(2, len(node.input)):
                if node.input[i] in weights:
                    node.input[i] = casts.widened_constant(node.input[i], model_path.parent)
            nodes.append(node)
        elif (
            node.op_type == "MatMul"
            and second in weights
            and uses[second] == 1
            and np.prod(weights[second].dims) > SLICE_ELEMENTS
        ):
            nodes += casts.sliced_matmul(node)
        else:
            for i, name in enumerate(node.input):
                if name in weights:
                    node.input[i] = casts.widened_name(name)
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(casts.casts + nodes)
    return Graph(model, model_path.parent, runtime_casts=True)
