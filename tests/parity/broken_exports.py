"""Deliberately broken exports of a real artifact: the bugs an exporter could really have.

Each writes a new artifact folder next to nothing it changes: the graph is edited without its
weights (model.onnx only) and every other file, the 2 GB weight file included, is hard-linked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qwen_deploy.manifest import MANIFEST, Manifest


def _link_all(src: Path, out: Path, skip: tuple[str, ...] = ()) -> None:
    out.mkdir(parents=True)
    for item in src.iterdir():
        if item.name not in skip:
            os.link(item, out / item.name)


def _edit_graph(src: Path, out: Path, edit) -> Path:
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    edit(model.graph)
    _link_all(src, out, skip=("model.onnx", MANIFEST))
    onnx.save(model, str(out / "model.onnx"))
    Manifest.read(src).save(out)  # records the edited graph's size and hash
    return out


def drop_qkv_bias(src: Path, out: Path, layer: int) -> Path:
    """One layer's q/k/v biases read as zeros (an exporter that forgot them)."""

    def edit(graph: onnx.GraphProto) -> None:
        for proj in ("q", "k", "v"):
            name = f"model.layers.{layer}.self_attn.{proj}_proj.bias"
            shape = next(i for i in graph.initializer if i.name == name).dims
            zeros = numpy_helper.from_array(np.zeros(shape, np.float32), f"{name}.dropped")
            graph.initializer.append(zeros)
            for node in graph.node:
                node.input[:] = [zeros.name if i == name else i for i in node.input]

    return _edit_graph(src, out, edit)


def decode_positions_off_by_one(src: Path, out: Path) -> Path:
    """Positions one ahead whenever there is a past (an off-by-one in the decode step's position).

    A uniform shift of every position would be invisible: RoPE scores depend only on relative
    positions. This one puts new tokens one position further from the cached ones.
    """

    def edit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            node.input[:] = [
                "position_ids.shifted" if i == "position_ids" else i for i in node.input
            ]
        graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "shift.zero"))
        past = graph.input[3].name  # past_key_values.0.key [batch, kv_heads, past, head_dim]
        nodes = [
            helper.make_node("Shape", [past], ["shift.past_len"], start=2, end=3),
            helper.make_node("Greater", ["shift.past_len", "shift.zero"], ["shift.has_past"]),
            helper.make_node("Cast", ["shift.has_past"], ["shift.one"], to=onnx.TensorProto.INT64),
            helper.make_node("Add", ["position_ids", "shift.one"], ["position_ids.shifted"]),
        ]
        for node in reversed(nodes):
            graph.node.insert(0, node)

    return _edit_graph(src, out, edit)


def rope_theta_checkpoint(src: Path, out: Path, theta: float) -> Path:
    """The checkpoint with another RoPE theta in config.json (weights linked, not copied)."""
    _link_all(src, out, skip=("config.json",))
    config = json.loads((src / "config.json").read_text())
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        params["rope_theta"] = theta
    else:
        config["rope_theta"] = theta
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
