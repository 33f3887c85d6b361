"""Rewrite a graph node by node and write it, with its weights, into a new artifact folder.

Quantizers say which nodes to replace and which initializers to add or override; everything else
(norm weights, biases, RoPE tables, ...) is copied tensor by tensor into the new data file.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..contract import MS_DOMAIN
from .store import SourceTensors, TensorWriter


class GraphRewrite:
    """Pending node replacements and new initializers for one graph."""

    def __init__(self, model: onnx.ModelProto, source: SourceTensors, writer: TensorWriter):
        self.model = model
        self.source = source
        self.writer = writer
        self._replace: dict[str, list[onnx.NodeProto]] = {}  # by first output: unique in a graph
        self._new: dict[str, TensorProto] = {}
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_q{self._count}"

    def replace(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        """Put `new_nodes` where `node` was (an empty list deletes it)."""
        self._replace[node.output[0]] = new_nodes

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Write `array` as initializer `name` (replacing the source's tensor of that name)."""
        self._new[name] = self.writer.tensor(name, array)
        return name

    def node(
        self,
        op_type: str,
        inputs: list[str],
        hint: str,
        outputs: list[str] | None = None,
        domain: str = "",
        **attrs,
    ) -> onnx.NodeProto:
        outputs = outputs or [self.name(hint + "/out")]
        return helper.make_node(
            op_type, inputs, outputs, name=self.name(hint), domain=domain, **attrs
        )

    def finish(self) -> onnx.ModelProto:
        """The rewritten model; unchanged initializers it still uses are copied to the new data."""
        graph = self.model.graph
        nodes = []
        for node in graph.node:
            nodes.extend(self._replace.get(node.output[0], [node]))
        used = {name for node in nodes for name in node.input}
        kept = []
        for tensor in graph.initializer:
            if tensor.name in self._new or tensor.name not in used:
                continue
            if tensor.data_location == TensorProto.EXTERNAL:
                tensor = self.writer.tensor(tensor.name, np.asarray(self.source.array(tensor.name)))
            kept.append(tensor)
        kept += [t for name, t in self._new.items() if name in used]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        if any(n.domain == MS_DOMAIN for n in nodes) and not any(
            o.domain == MS_DOMAIN for o in self.model.opset_import
        ):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return self.model
