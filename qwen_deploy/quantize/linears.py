"""Find the decoder's linear layers in an exported graph, with what feeds them and what they feed.

The exporter names each weight initializer after its checkpoint tensor (stored transposed, [in,
out], for MatMul(x, W)), so a linear layer is a MatMul whose second input is such an initializer,
optionally followed by an Add of its bias. Quantizers rewrite these and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx

from ..errors import ArtifactError

_LAYER = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.weight$")
LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


@dataclass
class Linear:
    """One MatMul(x, W[K, N]) (+ bias) of the decoder."""

    matmul: onnx.NodeProto
    weight: str
    role: str  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or lm_head
    layer: int | None
    shape: tuple[int, int]  # [K, N]
    bias_add: onnx.NodeProto | None = None

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bias(self) -> str | None:
        return self.bias_add.input[1] if self.bias_add is not None else None

    @property
    def input(self) -> str:
        return self.matmul.input[0]

    @property
    def output(self) -> str:
        """The layer's result: after the bias Add when there is one."""
        return (self.bias_add or self.matmul).output[0]


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output}


def find_linears(graph: onnx.GraphProto) -> list[Linear]:
    """Every linear layer in graph order; refuses graphs that are not plain exported decoders."""
    initializers = {t.name: t for t in graph.initializer}
    users = consumers(graph)
    found = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        weight = node.input[1]
        match = _LAYER.match(weight)
        if match:
            layer, role = int(match.group(1)), match.group(2)
        elif weight == LM_HEAD:
            layer, role = None, "lm_head"
        else:
            continue
        after = users.get(node.output[0], [])
        bias_add = None
        if (
            len(after) == 1
            and after[0].op_type == "Add"
            and after[0].input[0] == node.output[0]
            and after[0].input[1] in initializers
        ):
            bias_add = after[0]
        shape = tuple(initializers[weight].dims)
        found.append(Linear(node, weight, role, layer, (shape[0], shape[1]), bias_add))
    if not found:
        raise ArtifactError(
            "the graph has no linear layers with exporter-named weights (MatMul on "
            "'model.layers.N....weight'); is it already quantized? Quantize an fp32 or fp16 "
            "artifact written by `qwen-deploy export`."
        )
    return found


def final_norm(graph: onnx.GraphProto, head: Linear) -> tuple[str, str]:
    """(per-token RMS [batch, seq, 1], weight) of the final RMSNorm: the lm_head input is
    Mul(Div(residual, rms) (cast back for fp16 graphs), weight)."""
    made = producers(graph)
    scale = made.get(head.input)
    node = made.get(scale.input[0]) if scale is not None and scale.op_type == "Mul" else None
    if node is not None and node.op_type == "Cast":
        node = made.get(node.input[0])
    if scale is None or node is None or node.op_type != "Div":
        raise ArtifactError(
            "the lm_head input is not the exporter's final RMSNorm (Mul(Div(residual, rms), "
            "weight)); quantize an artifact written by `qwen-deploy export`."
        )
    return node.input[1], scale.input[1]


def residual_after(graph: onnx.GraphProto, lin: Linear) -> str:
    """The residual stream once `lin`'s output (o_proj, down_proj) is added to it."""
    add = next((n for n in consumers(graph).get(lin.output, []) if n.op_type == "Add"), None)
    if add is None:
        raise ArtifactError(
            f"{lin.weight}'s output is not added to the residual stream; quantize an artifact "
            "written by `qwen-deploy export`."
        )
    return add.output[0]
