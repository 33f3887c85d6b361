"""Pre-flight for TensorRT: will its ONNX parser import this graph? Runs without TensorRT.

Building an engine needs a GPU and minutes; a graph the parser rejects should fail here, on any
machine, with the node named and the fix. The rules are what TensorRT's ONNX parser documents
(op table and restrictions below) plus the constraints that bite for this model: the Attention and
RotaryEmbedding import rules, explicit-quantization (Q/DQ) conventions, dtypes TensorRT lacks,
onnxruntime-only contrib ops, and external data.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, numpy_helper, shape_inference

from ..contract import MS_DOMAIN
from ..errors import QwenDeployError

# Source: onnx/onnx-tensorrt docs/operators.md for TensorRT 10.15 GA ("supports operators in the
# inclusive range of opset 9 to opset 24"), the parser's operator support matrix: op -> the tensor
# types its importer accepts. The 10.14 GA parser added Attention; the 10.15 GA parser added
# RotaryEmbedding, RMSNormalization and TensorScatter (onnx-tensorrt Changelog / PR #1048).
_F = ("FP32", "FP16", "BF16")
_I = ("INT32", "INT64")
_B = ("BOOL",)
_FIB = _F + _I + _B
_FI = _F + _I
_HALF = ("FP32", "FP16")
_CONST = (*_F, "FP8", "FP4", "INT4", *_I, *_B)
_FLOAT_OPS = """
    Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv
    ConvTranspose Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool
    GlobalLpPool GlobalMaxPool GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler
    InstanceNormalization IsInf LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM
    LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus PRelu
    QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal Resize
    RMSNormalization RNN RotaryEmbedding Round ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax
    Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"""
_FLOAT_INT_OPS = """
    Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max
    Min Mod Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements
    ScatterND Shrink Sign SpaceToDepth Sub Sum TopK"""
_FLOAT_INT_BOOL_OPS = """
    Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape
    ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where"""
_HALF_OPS = """
    BlackmanWindow DeformConv GridSample HammingWindow HannWindow Mish NonMaxSuppression NonZero
    RoiAlign"""
SUPPORTED_OPS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(_FLOAT_OPS.split(), _F),
    **dict.fromkeys(_FLOAT_INT_OPS.split(), _FI),
    **dict.fromkeys(_FLOAT_INT_BOOL_OPS.split(), _FIB),
    **dict.fromkeys(["And", "Not", "Or", "Xor"], _B),
    **dict.fromkeys(_HALF_OPS.split(), _HALF),
    "Attention": (*_F, "INT8", "FP8"),
    "Cast": (*_FI, "UINT8", "BOOL"),
    "CastLike": (*_FI, "UINT8", "BOOL"),
    "Constant": _CONST,
    "ConstantOfShape": _CONST,
    "DequantizeLinear": ("INT8", "FP8", "FP4", "INT4"),
    "Gelu": (*_F, "INT8", *_I),
    "Mean": (*_F, "FP8", *_I),
    "STFT": ("FP32",),
    "TensorScatter": (*_F, "INT32"),
}
OP_SINCE: dict[str, tuple[int, int]] = {
    "Attention": (10, 14),
    "RotaryEmbedding": (10, 15),
    "RMSNormalization": (10, 15),
    "TensorScatter": (10, 15),
}
OPSET_RANGE = (9, 24)
MIN_TRT = (10, 14)
# The oldest supported parser: the `onnx` export form writes RoPE as elementwise ops (not
# RotaryEmbedding, 10.15+) so that 10.14, the first with Attention, imports it.
DEFAULT_TRT_VERSION = "10.14"
PROTOBUF_LIMIT = 2 << 30

TRT_TYPES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.BOOL: "BOOL",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.INT4: "INT4",
    TensorProto.FLOAT4E2M1: "FP4",
}
QUANTIZED = {"INT8", "FP8", "INT4", "FP4"}
QDQ = ("QuantizeLinear", "DequantizeLinear")
TYPE_NAMES = {v: k for k, v in TensorProto.DataType.items()}


@dataclass
class Finding:
    """One problem: severity (error/warning/info), where (node name and op), what, and the fix."""

    severity: str
    node: str
    op: str
    message: str
    fix: str

    def line(self) -> str:
        where = f"{self.node} ({self.op})" if self.node else self.op
        return f"{self.severity}: {where}: {self.message} Fix: {self.fix}"


@dataclass
class CheckReport:
    model: str
    trt_version: str
    findings: list[Finding] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "trt_version": self.trt_version,
            "passed": self.passed,
            "errors": len(self.errors),
            "warnings": sum(f.severity == "warning" for f in self.findings),
            "ops": self.ops,
            "findings": [asdict(f) for f in self.findings],
        }

    def text(self) -> str:
        lines = [f.line() for f in self.findings]
        verdict = "passes" if self.passed else f"fails ({len(self.errors)} error(s))"
        lines.append(
            f"{self.model}: {sum(self.ops.values())} nodes, {len(self.ops)} op types; "
            f"TensorRT >= {self.trt_version} pre-flight {verdict}"
        )
        return "\n".join(lines)


def parse_version(text: str) -> tuple[int, int]:
    """'10.15' or '10.15.1.29' -> (10, 15)."""
    try:
        major, minor = (int(p) for p in str(text).split(".")[:2])
    except ValueError:
        raise QwenDeployError(
            f"TensorRT version {text!r} is not of the form MAJOR.MINOR (e.g. 10.15)."
        ) from None
    return major, minor


class _Graph:
    """Types, ranks, producers, consumers and constant values of a graph's tensors."""

    def __init__(self, model: onnx.ModelProto):
        try:
            inferred = shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # inference is an aid: fall back to declared value infos
            inferred = model
        g = inferred.graph
        self.nodes = list(model.graph.node)
        self.inputs = {v.name for v in g.input}
        self.outputs = {v.name for v in g.output}
        self.types: dict[str, int] = {}
        self.ranks: dict[str, int] = {}
        for v in [*g.input, *g.output, *g.value_info]:
            tt = v.type.tensor_type
            if tt.elem_type:
                self.types[v.name] = tt.elem_type
            if tt.HasField("shape"):
                self.ranks[v.name] = len(tt.shape.dim)
        self.initializers = {t.name: t for t in model.graph.initializer}
        for t in self.initializers.values():
            self.types[t.name] = t.data_type
            self.ranks[t.name] = len(t.dims)
        self.constants: dict[str, TensorProto] = dict(self.initializers)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = value
                    self.types[node.output[0]] = value.data_type
                    self.ranks[node.output[0]] = len(value.dims)

    def type_name(self, name: str) -> str | None:
        elem = self.types.get(name)
        return TYPE_NAMES.get(elem) if elem else None

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def value(self, name: str, folder: Path | None) -> np.ndarray | None:
        """A small constant's value (zero points, scales), read from external data if needed."""
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        if tensor.data_location == TensorProto.EXTERNAL:
            if folder is None:
                return None
            tensor = TensorProto.FromString(tensor.SerializeToString())
            try:
                external_data_helper.load_external_data_for_tensor(tensor, str(folder))
            except OSError:
                return None
        return numpy_helper.to_array(tensor)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _present(node: onnx.NodeProto, index: int) -> bool:
    return len(node.input) > index and bool(node.input[index])


class _Checker:
    def __init__(
        self,
        model: onnx.ModelProto,
        folder: Path | None,
        version: tuple[int, int],
        plugin_ops: set[str],
    ):
        self.model = model
        self.folder = folder
        self.version = version
        self.plugin_ops = plugin_ops
        self.g = _Graph(model)
        self.findings: list[Finding] = []

    def add(
        self,
        severity: str,
        node: onnx.NodeProto | None,
        message: str,
        fix: str,
        op: str | None = None,
    ) -> None:
        self.findings.append(
            Finding(
                severity,
                node.name if node is not None else "",
                op or (node.op_type if node is not None else "graph"),
                message,
                fix,
            )
        )

    # -- whole graph --------------------------------------------------------------------------
    def opset(self) -> None:
        versions = {o.domain or "ai.onnx": o.version for o in self.model.opset_import}
        default = versions.get("ai.onnx")
        lo, hi = OPSET_RANGE
        if default is not None and not lo <= default <= hi:
            self.add(
                "error",
                None,
                f"the graph imports ONNX opset {default}; TensorRT's parser "
                f"supports opsets {lo} to {hi}.",
                f"re-export or convert the graph to an opset between {lo} and {hi}.",
                op="opset",
            )

    def external_data(self) -> None:
        """One finding per data file: missing, truncated, outside the folder, or its size."""
        if self.folder is None:
            return
        files: dict[str, list[tuple[str, int]]] = {}
        for tensor in self.g.initializers.values():
            if tensor.data_location == TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                end = int(info.get("offset", 0)) + int(info.get("length", 0))
                files.setdefault(info.get("location", ""), []).append((tensor.name, end))
        for location, tensors in files.items():
            path = self.folder / location
            where = (
                f"{len(tensors)} initializer(s) (first: {tensors[0][0]}) are stored in {location}"
            )
            if Path(location).is_absolute() or ".." in Path(location).parts:
                self.add(
                    "error",
                    None,
                    f"{where}, outside the model folder.",
                    "keep external data files next to model.onnx with relative locations.",
                    op="external data",
                )
            elif not path.is_file():
                self.add(
                    "error",
                    None,
                    f"{where}, which is missing.",
                    "copy the external data file next to the model (or re-export the artifact).",
                    op="external data",
                )
            elif max(end for _, end in tensors) > path.stat().st_size:
                self.add(
                    "error",
                    None,
                    f"{where}, which has {path.stat().st_size} bytes but "
                    f"should reach byte {max(end for _, end in tensors)}.",
                    "the data file is truncated: re-export the artifact.",
                    op="external data",
                )
            else:
                self.add(
                    "info",
                    None,
                    f"weights are external data in {location} "
                    f"({path.stat().st_size / 2**30:.2f} GiB).",
                    "parse the model from its "
                    "path (OnnxParser.parse_from_file) so the parser finds the data file; "
                    "`qwen-deploy build` does.",
                    op="external data",
                )

    def model_size(self, path: Path | None) -> None:
        if path is not None and path.is_file() and path.stat().st_size >= PROTOBUF_LIMIT:
            self.add(
                "error",
                None,
                f"{path.name} is {path.stat().st_size / 2**30:.1f} GiB; "
                "protobuf cannot read a single file of 2 GiB or more.",
                "save the weights as external data (qwen-deploy export does).",
                op="model file",
            )

    def graph_io(self) -> None:
        for name in sorted(self.g.inputs | self.g.outputs):
            if name in self.g.initializers:
                continue
            kind = self.g.type_name(name)
            if kind is not None and self.g.types[name] not in TRT_TYPES:
                self.add(
                    "error",
                    None,
                    f"graph input/output {name} is {kind}; TensorRT engines have no such I/O type.",
                    "cast it to float32/float16/int32/int64 in the graph.",
                    op="graph I/O",
                )

    # -- per node -----------------------------------------------------------------------------
    def node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self.custom_op(node)
            return
        if op not in SUPPORTED_OPS:
            self.add(
                "error",
                node,
                f"TensorRT's ONNX parser has no importer for {op}.",
                "replace it with supported ops (see onnx-tensorrt docs/operators.md) or "
                "register a TensorRT plugin of that name with --plugin-lib.",
            )
            return
        since = OP_SINCE.get(op)
        if since and self.version < since:
            self.add(
                "error",
                node,
                f"{op} is imported by TensorRT's parser only since "
                f"{since[0]}.{since[1]}; the target is {self.version[0]}.{self.version[1]}.",
                f"use TensorRT >= {since[0]}.{since[1]}"
                + (
                    " or export with --attention decomposed."
                    if op in ("Attention", "RotaryEmbedding")
                    else "."
                ),
            )
        self.types(node)
        check = getattr(self, f"op_{op}", None)
        if check:
            check(node)

    def custom_op(self, node: onnx.NodeProto) -> None:
        if node.op_type in self.plugin_ops:
            self.add(
                "info",
                node,
                f"{node.domain}::{node.op_type} will be imported through "
                "the loaded TensorRT plugin of that name.",
                "none needed.",
            )
            return
        if node.domain == MS_DOMAIN:
            fix = (
                "export with --attention onnx (TensorRT's fused IAttention) or "
                "--attention decomposed."
                if node.op_type
                in (
                    "GroupQueryAttention",
                    "MultiHeadAttention",
                    "Attention",
                    "RotaryEmbedding",
                    "SkipSimplifiedLayerNormalization",
                    "SimplifiedLayerNormalization",
                )
                else "build TensorRT engines from a graph without onnxruntime-specific ops "
                "(those are for the onnxruntime backend)."
            )
            self.add(
                "error",
                node,
                f"com.microsoft {node.op_type} is an onnxruntime contrib "
                "op; TensorRT's parser cannot import it.",
                fix,
            )
            return
        self.add(
            "error",
            node,
            f"{node.domain}::{node.op_type} is outside the ONNX standard "
            "domain; TensorRT imports it only through a plugin of that name.",
            "pass the plugin library with --plugin-lib, or rewrite the node with standard "
            "ONNX ops.",
        )

    def types(self, node: onnx.NodeProto) -> None:
        index = 1 if node.op_type == "Where" else 0
        if node.op_type in ("Shape", "Size", "Constant", "ConstantOfShape") or not _present(
            node, index
        ):
            return
        name = node.input[index]
        elem = self.g.types.get(name)
        if elem is None:
            return
        kind = TRT_TYPES.get(elem)
        if kind is None:
            if elem == TensorProto.DOUBLE:
                self.add(
                    "warning",
                    node,
                    f"input {name} is float64; TensorRT has no float64 "
                    "tensors and casts it to float32, clamping to the float32 range.",
                    "produce float32 (or float16) in the graph.",
                )
            else:
                self.add(
                    "error",
                    node,
                    f"input {name} is {TYPE_NAMES.get(elem)}, a type TensorRT does not have.",
                    "cast it to a supported type (float32/float16/bfloat16/int32/int64/bool).",
                )
            return
        if kind in QUANTIZED and node.op_type not in QDQ and node.op_type != "Attention":
            self.add(
                "error",
                node,
                f"input {name} is {kind}; TensorRT takes quantized types "
                "only through QuantizeLinear/DequantizeLinear.",
                "dequantize it with DequantizeLinear before this node.",
            )
            return
        if kind == "UINT8" and node.op_type != "Cast":
            self.add(
                "error",
                node,
                f"input {name} is uint8; TensorRT allows uint8 only as an "
                "engine input/output (cast right away).",
                "cast it to a supported type first, or quantize to int8 with zero point 0.",
            )
            return
        if kind not in SUPPORTED_OPS[node.op_type]:
            self.add(
                "warning",
                node,
                f"input {name} is {kind}, which TensorRT lists as "
                f"unsupported for {node.op_type} "
                f"(supported: {', '.join(SUPPORTED_OPS[node.op_type])}).",
                "cast the input to a listed type.",
            )

    # -- op-specific rules (onnx-tensorrt operators.md restrictions) ---------------------------
    def op_Attention(self, node: onnx.NodeProto) -> None:
        for index, name in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
            if _present(node, index):
                self.add(
                    "error",
                    node,
                    f"the node has a {name} input; TensorRT imports "
                    "Attention (IAttention) only without past_key/past_value/"
                    "nonpad_kv_seqlen.",
                    "concatenate the KV cache outside the node and "
                    "pass the full K/V (qwen-deploy export --attention onnx does).",
                )
        extra = [name for name in node.output[1:] if name]
        if extra:
            self.add(
                "error",
                node,
                f"the node produces {len(extra)} extra output(s) "
                "(present_key/present_value/qk_matmul_output); TensorRT supports only the "
                "attention output.",
                "produce present K/V with a Concat outside the node.",
            )
        for attr in ("qk_matmul_output_mode", "softcap"):
            if _attr(node, attr, 0):
                self.add(
                    "error",
                    node,
                    f"attribute {attr} is set; TensorRT's parser does not support it.",
                    f"remove {attr} (or use --attention decomposed).",
                )
        for index, role in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
            if not _present(node, index):
                continue
            rank = self.g.ranks.get(node.input[index])
            if rank is None:
                self.add(
                    "warning",
                    node,
                    f"the rank of {role} ({node.input[index]}) is "
                    "unknown; TensorRT needs 4D Q/K/V/attn_mask.",
                    "give the graph shape information (onnx shape inference) or reshape "
                    "explicitly to 4D.",
                )
            elif rank != 4:
                self.add(
                    "error",
                    node,
                    f"{role} ({node.input[index]}) is {rank}D; TensorRT "
                    "imports Attention only with 4D Q/K/V/attn_mask "
                    "([batch, heads, seq, head_dim]).",
                    "reshape to 4D and transpose "
                    "before the node (qwen-deploy export --attention onnx does).",
                )

    def op_RotaryEmbedding(self, node: onnx.NodeProto) -> None:
        if _present(node, 3):
            kind = self.g.type_name(node.input[3])
            if kind is not None and kind != "INT64":
                self.add(
                    "error",
                    node,
                    f"position_ids ({node.input[3]}) is {kind}; TensorRT "
                    "requires INT64 position_ids for RotaryEmbedding.",
                    "feed int64 position ids (the artifact's position_ids input is int64).",
                )
        rank = self.g.ranks.get(node.input[0])
        if rank is not None and rank != 4:
            self.add(
                "warning",
                node,
                f"the input is {rank}D; TensorRT's IRotaryEmbeddingLayer "
                "works on 4D [batch, heads, seq, head_dim].",
                "rotate after reshaping to 4D heads (qwen-deploy export --attention onnx).",
            )

    def _zero_point(self, node: onnx.NodeProto, index: int, role: str) -> None:
        if not _present(node, index):
            return
        name = node.input[index]
        value = self.g.value(name, self.folder)
        if value is None:
            self.add(
                "error",
                node,
                f"{role} {name} is not a constant TensorRT can read.",
                f"make {role} an initializer of zeros.",
            )
        elif np.any(value != 0):
            self.add(
                "error",
                node,
                f"{role} {name} is not zero; TensorRT supports symmetric "
                "quantization only (zero point 0).",
                "quantize symmetrically: scale = max|x| / 127, zero point 0.",
            )

    def _scale(self, node: onnx.NodeProto, data: str, activation: bool) -> None:
        scale = node.input[1]
        if not self.g.is_constant(scale):
            self.add(
                "error",
                node,
                f"scale {scale} is computed at run time; TensorRT needs "
                "build-time constant Q/DQ scales.",
                "store the scale as an initializer.",
            )
            return
        rank = self.g.ranks.get(scale, 0)
        dims = list(self.g.constants[scale].dims)
        per_tensor = rank == 0 or dims == [1]
        if _attr(node, "block_size", 0):
            self.add(
                "error",
                node,
                "block quantization (block_size) is not supported for INT8 by TensorRT.",
                "use per-tensor or per-channel scales.",
            )
            return
        if per_tensor:
            return
        if activation:
            self.add(
                "error",
                node,
                f"activation {data} has per-channel scales {dims}; "
                "TensorRT quantizes activations per-tensor only.",
                "use one scale for the whole activation tensor.",
            )
            return
        if rank != 1:
            self.add(
                "error",
                node,
                f"scale {scale} has shape {dims}; TensorRT needs a scalar "
                "(per-tensor) or a 1D per-channel scale.",
                "reshape the scale to 1D.",
            )
            return
        data_rank = self.g.ranks.get(data)
        axis = _attr(node, "axis", 1)
        if data_rank:
            axis %= data_rank
        weight = self.g.constants.get(data)
        if weight is not None and axis < len(weight.dims) and weight.dims[axis] != dims[0]:
            self.add(
                "error",
                node,
                f"per-channel scale {scale} has {dims[0]} values but axis "
                f"{axis} of {data} has {weight.dims[axis]}.",
                "give one scale per output channel along the quantized axis.",
            )
        for user in self.g.consumers.get(node.output[0], []):
            if (
                user.op_type in ("MatMul", "Gemm")
                and user.input[1] == node.output[0]
                and data_rank == 2
                and axis != 1
            ):
                self.add(
                    "error",
                    node,
                    f"weight {data} of {user.name} is quantized along "
                    f"axis {axis}; per-channel MatMul weights [K, N] must be quantized "
                    "along the output channel.",
                    "quantize per output channel (axis=1).",
                )

    def op_QuantizeLinear(self, node: onnx.NodeProto) -> None:
        data = node.input[0]
        if _present(node, 2):
            out_type = self.g.types.get(node.input[2])
        else:
            out_type = _attr(node, "output_dtype", 0) or TensorProto.UINT8
        kind = TRT_TYPES.get(out_type)
        if kind not in QUANTIZED:
            self.add(
                "error",
                node,
                f"the node quantizes to {TYPE_NAMES.get(out_type)}; "
                "TensorRT quantizes to INT8 (or FP8/INT4/FP4) only.",
                "give it an int8 zero point of 0 (or output_dtype=INT8).",
            )
        self._zero_point(node, 2, "y_zero_point")
        self._scale(node, data, activation=not self.g.is_constant(data))
        users = self.g.consumers.get(node.output[0], [])
        strays = [u.name or u.op_type for u in users if u.op_type != "DequantizeLinear"]
        if strays:
            self.add(
                "error",
                node,
                f"its output feeds {', '.join(strays)}; TensorRT's explicit "
                "quantization expects every QuantizeLinear to be followed by "
                "DequantizeLinear.",
                "insert DequantizeLinear after the QuantizeLinear "
                "(Q/DQ pairs before the consuming op).",
            )

    def op_DequantizeLinear(self, node: onnx.NodeProto) -> None:
        data = node.input[0]
        kind = self.g.type_name(data)
        if kind == "UINT8":
            self.add(
                "error",
                node,
                f"{data} is uint8; TensorRT dequantizes signed INT8 only.",
                "quantize to int8 with zero point 0.",
            )
        self._zero_point(node, 2, "x_zero_point")
        constant = self.g.is_constant(data)
        if not constant:
            producer = self.g.producer.get(data)
            if producer is None or producer.op_type != "QuantizeLinear":
                self.add(
                    "error",
                    node,
                    f"its input {data} comes from "
                    f"{producer.op_type if producer else 'a graph input'}; TensorRT "
                    "dequantizes constants or the output of a QuantizeLinear.",
                    "pair it with a QuantizeLinear (Q/DQ) or dequantize an initializer.",
                )
        self._scale(node, data, activation=not constant)

    def qdq_placement(self) -> None:
        mixed = []
        for node in self.g.nodes:
            if node.op_type not in ("MatMul", "Gemm"):
                continue
            dq = [self._dequantized(name) for name in node.input[:2]]
            if dq[0] and not dq[1]:
                mixed.append(node.name)
        if mixed:
            self.add(
                "warning",
                None,
                f"{len(mixed)} MatMul(s) quantize the activation but not "
                f"the weight (first: {mixed[0]}); TensorRT runs them in floating point.",
                "dequantize the weight too (int8 weight + DequantizeLinear).",
                op="Q/DQ",
            )

    def _dequantized(self, name: str) -> bool:
        producer = self.g.producer.get(name)
        return producer is not None and producer.op_type == "DequantizeLinear"

    def run(self, path: Path | None) -> list[Finding]:
        self.opset()
        self.model_size(path)
        self.external_data()
        self.graph_io()
        for node in _walk(self.model.graph):
            self.node(node)
        self.qdq_placement()
        return self.findings


def _walk(graph: onnx.GraphProto):
    """Every node, including those inside If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g)
            for sub in attr.graphs:
                yield from _walk(sub)


def check_model(
    model: onnx.ModelProto,
    folder: str | Path | None = None,
    trt_version: str = DEFAULT_TRT_VERSION,
    plugin_ops: set[str] | None = None,
    model_path: str | Path | None = None,
) -> CheckReport:
    """Check a loaded graph (external data not loaded; `folder` holds its data files)."""
    version = parse_version(trt_version)
    if version < MIN_TRT:
        raise QwenDeployError(
            f"check-trt covers TensorRT >= {MIN_TRT[0]}.{MIN_TRT[1]} (the first parser with the "
            f"ONNX Attention op); got {trt_version}."
        )
    checker = _Checker(model, Path(folder) if folder else None, version, set(plugin_ops or ()))
    findings = checker.run(Path(model_path) if model_path else None)
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order[f.severity])
    ops = Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}")
        for n in _walk(model.graph)
    )
    return CheckReport(
        str(model_path or model.graph.name),
        f"{version[0]}.{version[1]}",
        findings,
        dict(sorted(ops.items())),
    )


def resolve_model(path: str | Path) -> Path:
    """An artifact folder (its manifest's model file) or a path to an .onnx file."""
    path = Path(path)
    if path.is_dir():
        from ..manifest import Manifest

        manifest = Manifest.load(path)
        if not manifest.model_file.endswith(".onnx"):
            raise QwenDeployError(
                f"{path} holds {manifest.model_file}, not an ONNX graph; check-trt reads ONNX "
                "artifacts (the input of `qwen-deploy build`)."
            )
        return path / manifest.model_file
    if not path.is_file():
        raise QwenDeployError(f"{path} is neither an artifact folder nor an .onnx file.")
    return path


def check_path(
    path: str | Path, trt_version: str = DEFAULT_TRT_VERSION, plugin_ops: set[str] | None = None
) -> CheckReport:
    """Check an artifact folder or .onnx file without loading its weights."""
    model_path = resolve_model(path)
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise QwenDeployError(f"{model_path} is not a readable ONNX model ({e}).") from e
    return check_model(model, model_path.parent, trt_version, plugin_ops, model_path)


def report_json(report: CheckReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
