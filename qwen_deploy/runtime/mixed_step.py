"""One forward for the running rows' decode step and a newcomer's prefill chunk (gqa graphs).

A prefill chunk run as a forward of its own reads every weight again, so a step with one costs
the running streams at least twice a decode step however small the chunk. Here the running rows'
tokens and the chunk's tokens go through the linears, norms and LM head packed together (vLLM's
one forward per step), and only attention runs per lane: the running rows at one token each over
their own caches, the chunk over its request's one-row cache, each the GroupQueryAttention it runs
alone. The linears compute each row on its own (at the default blocks), so every row's logits and
cache are bit for bit those of the separate forwards: batch invariance holds.

The session's graph is an If over the artifact's graph: `mixed_step` false (the default) runs the
artifact's graph as it is, true the two-lane copy built here. Both branches read the same
initializers, which onnxruntime prepacks once per session: the second branch costs no weights.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    POSITION_IDS,
    is_past,
)

MIXED = "mixed_step"  # bool input: run the two-lane branch
CHUNK = "chunk."  # prefix of the chunk lane's inputs and outputs
LANE_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS_TO_KEEP)


def chunk_name(name: str) -> str:
    """The chunk lane's counterpart of a graph input or output."""
    return CHUNK + name


def mixable(model: onnx.ModelProto) -> bool:
    """Whether `model` is a decoder this module rewrites: GroupQueryAttention with
    `logits_to_keep` (artifacts from before it keep separate forwards)."""
    graph = model.graph
    return any(i.name == LOGITS_TO_KEEP for i in graph.input) and any(
        n.op_type == "GroupQueryAttention" for n in graph.node
    )


def add_mixed_step(model: onnx.ModelProto) -> None:
    """Rewrite `model` (a gqa decoder, external data left where it is) in place as an If over
    its own nodes and their two-lane copy, with the chunk lane's inputs (defaults for steps
    without a chunk) and outputs added. The initializers stay where they are: no copy of them."""
    graph = model.graph
    presents = _present_of_past(graph)
    past = [i for i in graph.input if i.name in presents]
    outputs = list(graph.output)
    decode = _branch(graph, "decode", _pass_chunk_through(graph, past, presents))
    mixed = _branch(graph, "mixed", _TwoLanes(graph, presents).nodes())
    if_outputs = [o.name for o in outputs] + [chunk_name(o.name) for o in outputs]
    chunk_inputs, defaults = _chunk_inputs(graph, past), _chunk_defaults(graph, past)
    del graph.node[:]
    graph.node.append(
        helper.make_node(
            "If", [MIXED], if_outputs, "mixed_or_decode", then_branch=mixed, else_branch=decode
        )
    )
    graph.input.extend(chunk_inputs)
    graph.output.extend(_typed(o, chunk_name(o.name)) for o in outputs)
    graph.initializer.extend(defaults)


def _renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    out = copy.deepcopy(value)
    out.name = name
    return out


def _typed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    """`value`'s element type under `name`, its shape left open (the lanes' shapes differ)."""
    return helper.make_tensor_value_info(name, value.type.tensor_type.elem_type, None)


def _chunk_inputs(graph: onnx.GraphProto, past: list) -> list[onnx.ValueInfoProto]:
    inputs = {i.name: i for i in graph.input}
    lane = [inputs[name] for name in LANE_INPUTS]
    chunk = [_renamed(v, chunk_name(v.name)) for v in lane + past]
    for value in chunk:  # its own symbolic dimensions: the lanes' batches and lengths differ
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = chunk_name(dim.dim_param)
    return [*chunk, helper.make_tensor_value_info(MIXED, TensorProto.BOOL, [])]


def _chunk_defaults(graph: onnx.GraphProto, past: list) -> list[TensorProto]:
    """Defaults of the chunk lane's inputs: what a step without a chunk leaves unfed."""
    tensors = [
        numpy_helper.from_array(np.zeros((1, 1), np.int64), chunk_name(INPUT_IDS)),
        numpy_helper.from_array(np.ones((1, 1), np.int64), chunk_name(ATTENTION_MASK)),
        numpy_helper.from_array(np.zeros((1, 1), np.int64), chunk_name(POSITION_IDS)),
        numpy_helper.from_array(np.array(1, np.int64), chunk_name(LOGITS_TO_KEEP)),
        numpy_helper.from_array(np.array(False), MIXED),
    ]
    for value in past:
        dims = value.type.tensor_type.shape.dim
        shape = (1, dims[1].dim_value, 0, dims[3].dim_value)
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        tensors.append(numpy_helper.from_array(np.zeros(shape, dtype), chunk_name(value.name)))
    return tensors


def _pass_chunk_through(
    graph: onnx.GraphProto, past: list, presents: dict[str, str]
) -> list[onnx.NodeProto]:
    """The artifact's nodes, then the chunk lane's outputs of a step without a chunk: its cache
    as it was and no logits."""
    logits = next(o for o in graph.output if o.name == LOGITS)
    elem = logits.type.tensor_type.elem_type
    nodes = list(graph.node)
    nodes.append(
        helper.make_node(
            "ConstantOfShape",
            [_const(nodes, "decode/no_logits_shape", [1, 0, 0])],
            [chunk_name(LOGITS)],
            value=helper.make_tensor("zero", elem, [1], [0]),
        )
    )
    for value in past:
        nodes.append(
            helper.make_node(
                "Identity", [chunk_name(value.name)], [chunk_name(presents[value.name])]
            )
        )
    return nodes


def _present_of_past(graph: onnx.GraphProto) -> dict[str, str]:
    """Each GroupQueryAttention's past key / value input -> its present output."""
    pairs = {}
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            pairs[node.input[3]], pairs[node.input[4]] = node.output[1], node.output[2]
    return pairs


def _const(nodes: list[onnx.NodeProto], name: str, value) -> str:
    nodes.append(
        helper.make_node(
            "Constant",
            [],
            [name],
            value=numpy_helper.from_array(np.asarray(value, np.int64), name),
        )
    )
    return name


def _branch(graph: onnx.GraphProto, tag: str, nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
    """`nodes` as an If branch: every value they make renamed under `tag` (a branch may not
    shadow the outer graph's names); its outputs are the graph's, then the chunk lane's."""
    renamed: dict[str, str] = {}
    out = []
    for index, node in enumerate(nodes):
        node = copy.deepcopy(node)
        node.name = f"{tag}/{node.name or index}"
        node.input[:] = [renamed.get(x, x) for x in node.input]
        for i, name in enumerate(node.output):
            if name:
                renamed[name] = node.output[i] = f"{tag}/{name}"
        out.append(node)
    values = [_typed(o, renamed[o.name]) for o in graph.output]
    values += [_typed(o, renamed[chunk_name(o.name)]) for o in graph.output]
    return helper.make_graph(out, tag, [], values)


class _TwoLanes:
    """The decoder's nodes rewritten for a packed step: lane a (the graph's own inputs, the
    running rows) and lane b (the chunk lane's inputs) in one [1, rows_a + rows_b, ...] stream
    through everything but rotary embeddings and attention, which run once per lane."""

    def __init__(self, graph: onnx.GraphProto, presents: dict[str, str]):
        self.graph = graph
        self._presents = presents  # past input -> present output of each attention
        self.nodes_out: list[onnx.NodeProto] = []
        self.lanes: dict[str, str] = {}  # a per-lane value (masks, lengths) -> lane b's
        self._count = 0

    # -- small pieces --------------------------------------------------------------------------
    def _op(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        self._count += 1
        output = output or f"lanes/{op}_{self._count}"
        self.nodes_out.append(
            helper.make_node(op, inputs, [output], f"lanes/{op}_{self._count}", **attrs)
        )
        return output

    def _int64(self, value) -> str:
        self._count += 1
        return _const(self.nodes_out, f"lanes/const_{self._count}", value)

    def _in_lane_b(self, name: str) -> str:
        """What lane b reads where the graph reads `name`."""
        if name in LANE_INPUTS or is_past(name):
            return chunk_name(name)
        return self.lanes.get(name, name)

    def _split(self, packed: str) -> tuple[str, str]:
        """Lane a's and b's rows of a packed [1, n, d] value, each shaped [rows, seq, d]."""
        parts = []
        for start, end, shape in (
            (self._zero, self._rows_a, self._shape_a),
            (self._rows_a, self._end, self._shape_b),
        ):
            part = self._op("Slice", [packed, start, end, self._one])
            parts.append(self._op("Reshape", [part, shape]))
        return parts[0], parts[1]

    def _pack(self, a: str, b: str, output: str) -> str:
        """[rows, seq, d] of both lanes as one packed [1, n, d] value."""
        flat = self._int64([1, -1, 0])
        return self._op(
            "Concat",
            [self._op("Reshape", [a, flat]), self._op("Reshape", [b, flat])],
            output,
            axis=1,
        )

    def _per_lane(self, node: onnx.NodeProto, first: list) -> tuple[str, str]:
        """`node` once per lane: its first inputs from `first` ((lane a's, lane b's) each), lane
        b's other inputs its own; each copy's first output suffixed by its lane."""
        outputs = []
        for lane in (0, 1):
            twin = copy.deepcopy(node)
            twin.name = f"{node.name}/lane_{'ab'[lane]}"
            twin.input[:] = [pair[lane] for pair in first] + [
                self._in_lane_b(x) if lane else x for x in node.input[len(first) :]
            ]
            twin.output[0] = f"{node.output[0]}/lane_{'ab'[lane]}"
            if lane and node.op_type == "GroupQueryAttention":  # the chunk's own cache
                twin.output[1:3] = [chunk_name(self._presents[x]) for x in node.input[3:5]]
            self.nodes_out.append(twin)
            outputs.append(twin.output[0])
        return outputs[0], outputs[1]

    # -- the rewrite -----------------------------------------------------------------------------
    def nodes(self) -> list[onnx.NodeProto]:
        hidden = self._hidden_values()
        self._zero, self._one = self._int64([0]), self._int64([1])
        self._end = self._int64([np.iinfo(np.int64).max])
        ids_a = self._op("Reshape", [INPUT_IDS, self._int64([1, -1])])
        ids_b = self._op("Reshape", [chunk_name(INPUT_IDS), self._int64([1, -1])])
        packed_ids = self._op("Concat", [ids_a, ids_b], axis=1)
        self._rows_a = self._op("Slice", [self._op("Shape", [ids_a]), self._one, self._int64([2])])
        self._shape_a, self._shape_b = (
            self._op("Concat", [self._op("Shape", [ids]), self._int64([-1])], axis=0)
            for ids in (INPUT_IDS, chunk_name(INPUT_IDS))
        )
        rope: dict[str, tuple[str, str]] = {}  # rotary output -> its lanes' outputs
        for node in self.graph.node:
            per_lane = any(x in LANE_INPUTS or x in self.lanes for x in node.input)
            if node.output[0] in hidden and node.op_type == "RotaryEmbedding":
                rope[node.output[0]] = self._per_lane(node, [self._split(node.input[0])])
            elif node.output[0] in hidden and node.op_type == "GroupQueryAttention":
                first = [rope.get(x) or self._split(x) for x in node.input[:3]]  # q, k, v
                self._pack(*self._per_lane(node, first), node.output[0])
            elif node.output[0] in hidden and INPUT_IDS in node.input:  # the embedding
                gather = copy.deepcopy(node)
                gather.input[1] = packed_ids
                self.nodes_out.append(gather)
            elif node.output[0] in hidden and any(x in self.lanes for x in node.input):
                self._kept = self._per_lane(node, [self._split(node.input[0])])  # logits_to_keep
                self._pack(*self._kept, node.output[0])
            elif node.output[0] in hidden or not per_lane:  # per token, or weights' casts
                self.nodes_out.append(node)
            else:  # masks, lengths, positions: once per lane
                twin = copy.deepcopy(node)
                twin.name = chunk_name(node.name) if node.name else ""
                twin.input[:] = [self._in_lane_b(x) for x in node.input]
                for i, name in enumerate(node.output):
                    self.lanes[name] = twin.output[i] = chunk_name(name)
                self.nodes_out += [node, twin]
        self._split_logits()
        return self.nodes_out

    def _hidden_values(self) -> set[str]:
        """Values computed from the token embeddings (everything per token)."""
        hidden: set[str] = set()
        for node in self.graph.node:
            embedding = node.op_type == "Gather" and node.input[1] == INPUT_IDS
            if embedding or any(x in hidden for x in node.input):
                hidden.update(node.output)
        return hidden

    def _split_logits(self) -> None:
        """The LM head ran on both lanes' kept rows: lane a's as `logits`, b's as the chunk's."""
        head = next(n for n in self.nodes_out if LOGITS in n.output)
        packed = "lanes/logits"
        head.output[list(head.output).index(LOGITS)] = packed
        shape_a = self._op("Shape", [self._kept[0]])
        rows_a = self._op(
            "ReduceProd", [self._op("Slice", [shape_a, self._zero, self._int64([2])])], keepdims=1
        )
        part_a = self._op("Slice", [packed, self._zero, rows_a, self._one])
        rows_seq = self._op("Slice", [shape_a, self._zero, self._int64([2])])
        self._op(
            "Reshape", [part_a, self._op("Concat", [rows_seq, self._int64([-1])], axis=0)], LOGITS
        )
        self._op("Slice", [packed, rows_a, self._end, self._one], chunk_name(LOGITS))
