"""check-trt: graphs TensorRT's ONNX parser must reject are rejected (node and fix named), and the
export forms meant for TensorRT pass."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qwen_deploy.cli import main
from qwen_deploy.errors import QwenDeployError
from qwen_deploy.tensorrt.preflight import check_model, check_path

F, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


def model(nodes, inputs, outputs, initializers=(), opset=23, domains=()):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
        initializer=list(initializers),
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets)


def errors(report, op=None):
    return [f for f in report.errors if op is None or f.op == op]


def attention_inputs(rank3: bool = False):
    if rank3:
        return [("q", F, [1, 3, 32]), ("k", F, [1, 3, 16]), ("v", F, [1, 3, 16])]
    return [("q", F, [1, 4, 3, 8]), ("k", F, [1, 2, 3, 8]), ("v", F, [1, 2, 3, 8])]


def test_attention_with_past_inputs_fails_naming_node_and_fix():
    node = helper.make_node(
        "Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pres_k", "pres_v"], name="layer0/attn"
    )
    m = model(
        [node],
        [*attention_inputs(), ("pk", F, [1, 2, 5, 8]), ("pv", F, [1, 2, 5, 8])],
        [("y", F, None), ("pres_k", F, None), ("pres_v", F, None)],
    )
    report = check_model(m)
    found = errors(report, "Attention")
    assert not report.passed
    assert {f.node for f in found} == {"layer0/attn"}
    messages = " ".join(f.message for f in found)
    assert "past_key" in messages and "past_value" in messages and "extra output" in messages
    assert any("concatenate the KV cache outside the node" in f.fix for f in found)


def test_attention_with_3d_inputs_fails():
    node = helper.make_node(
        "Attention", ["q", "k", "v"], ["y"], name="attn3d", q_num_heads=4, kv_num_heads=2
    )
    report = check_model(model([node], attention_inputs(rank3=True), [("y", F, None)]))
    found = errors(report, "Attention")
    assert [f.message.split(" ")[0] for f in found] == ["Q", "K", "V"]
    assert all("3D" in f.message and "4D" in f.message for f in found)


def test_attention_4d_without_past_passes():
    mask = ("mask", TensorProto.BOOL, [1, 1, 3, 3])
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], name="attn")
    report = check_model(model([node], [*attention_inputs(), mask], [("y", F, None)]))
    assert report.passed, report.text()


def test_unsupported_op_fails():
    node = helper.make_node("Det", ["x"], ["y"], name="det0")
    report = check_model(model([node], [("x", F, [2, 3, 3])], [("y", F, None)]))
    [finding] = errors(report)
    assert (finding.node, finding.op) == ("det0", "Det")
    assert "no importer for Det" in finding.message


def test_custom_domain_op_fails_unless_a_plugin_provides_it():
    node = helper.make_node("MyOp", ["x"], ["y"], name="custom", domain="my.domain")
    m = model([node], [("x", F, [2])], [("y", F, None)], domains=["my.domain"])
    [finding] = errors(check_model(m))
    assert "--plugin-lib" in finding.fix
    report = check_model(m, plugin_ops={"MyOp"})
    assert report.passed and report.findings[0].severity == "info"


def test_opset_outside_parser_range_fails():
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    report = check_model(model([node], [("x", F, [2])], [("y", F, None)], opset=25))
    assert [f.op for f in report.errors] == ["opset"]
    assert "25" in report.errors[0].message


def test_rotary_embedding_needs_int64_positions_and_trt_10_15():
    cache = numpy_helper.from_array(np.zeros((16, 4), np.float32), "cos")
    sin = numpy_helper.from_array(np.zeros((16, 4), np.float32), "sin")
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], name="rope")
    inputs = [("x", F, [1, 2, 3, 8])]
    int32 = model(
        [node], [*inputs, ("pos", TensorProto.INT32, [1, 3])], [("y", F, None)], [cache, sin]
    )
    [finding] = errors(check_model(int32, trt_version="10.15"))
    assert finding.node == "rope" and "INT64" in finding.message
    int64 = model([node], [*inputs, ("pos", I64, [1, 3])], [("y", F, None)], [cache, sin])
    assert check_model(int64, trt_version="10.15").passed
    [old] = errors(check_model(int64, trt_version="10.14"))
    assert "since 10.15" in old.message and "--attention decomposed" in old.fix


def test_versions_before_10_14_are_refused():
    with pytest.raises(QwenDeployError, match=r"TensorRT >= 10\.14"):
        check_model(model([], [("x", F, [1])], [("x", F, None)]), trt_version="10.8")


def test_float64_and_uint8_dtypes():
    add = helper.make_node("Add", ["x", "x"], ["y"], name="add64")
    report = check_model(
        model([add], [("x", TensorProto.DOUBLE, [2])], [("y", TensorProto.DOUBLE, None)])
    )
    assert {f.op for f in report.errors} == {"graph I/O"}
    assert any(
        f.severity == "warning" and f.node == "add64" and "float64" in f.message
        for f in report.findings
    )
    relu = helper.make_node("Relu", ["u"], ["y"], name="relu8")
    [finding] = errors(
        check_model(
            model([relu], [("u", TensorProto.UINT8, [2])], [("y", TensorProto.UINT8, None)])
        )
    )
    assert finding.node == "relu8" and "uint8" in finding.message


# -- Q/DQ (the INT8 SmoothQuant convention: int8, zero point 0, per-tensor activations,
#    per-channel weights along axis 1 of a [K, N] MatMul weight) -----------------------------
def qdq_model(
    act_zero=0,
    act_zp=True,
    weight_axis=1,
    act_scale_shape=(),
    q_consumer="DequantizeLinear",
    activation_dq_from_q=True,
):
    k, n = 16, 8
    w_scale_len = n if weight_axis == 1 else k
    inits = [
        numpy_helper.from_array(np.full(act_scale_shape, 0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(act_zero, np.int8), "x_zp"),
        numpy_helper.from_array(np.ones((k, n), np.int8), "w_q"),
        numpy_helper.from_array(np.full(w_scale_len, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(w_scale_len, np.int8), "w_zp"),
    ]
    q_inputs = ["x", "x_scale", "x_zp"] if act_zp else ["x", "x_scale"]
    nodes = []
    if activation_dq_from_q:
        nodes.append(helper.make_node("QuantizeLinear", q_inputs, ["xq"], name="q_x", axis=-1))
        if q_consumer == "DequantizeLinear":
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq_x", axis=-1
                )
            )
        else:
            nodes.append(helper.make_node("Cast", ["xq"], ["xd"], name="cast_x", to=F))
        inputs = [("x", F, [1, 4, k])]
    else:
        nodes.append(
            helper.make_node("DequantizeLinear", ["xi", "x_scale", "x_zp"], ["xd"], name="dq_x")
        )
        inputs = [("xi", TensorProto.INT8, [1, 4, k])]
    nodes += [
        helper.make_node(
            "DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w", axis=weight_axis
        ),
        helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm"),
    ]
    return model(nodes, inputs, [("y", F, None)], inits, opset=21)


def test_qdq_smoothquant_convention_passes():
    report = check_model(qdq_model())
    assert report.passed, report.text()
    assert not [f for f in report.findings if f.severity == "warning"]


@pytest.mark.parametrize(
    ("kwargs", "node", "needle"),
    [
        ({"act_zero": 3}, "q_x", "not zero"),
        ({"act_zp": False}, "q_x", "UINT8"),
        ({"weight_axis": 0}, "dq_w", "output channel"),
        ({"act_scale_shape": (16,)}, "q_x", "per-tensor only"),
        ({"q_consumer": "Cast"}, "q_x", "followed by DequantizeLinear"),
        ({"activation_dq_from_q": False}, "dq_x", "graph input"),
    ],
)
def test_qdq_violations_fail(kwargs, node, needle):
    report = check_model(qdq_model(**kwargs))
    assert any(f.node == node and needle in f.message for f in report.errors), report.text()


def test_external_data_missing_or_truncated(tmp_path):
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    m = model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", F, [1, 64])],
        [("y", F, None)],
        [weight],
    )
    onnx.save_model(
        m, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0
    )
    ok = check_path(tmp_path / "m.onnx")
    assert ok.passed and any(f.op == "external data" and f.severity == "info" for f in ok.findings)
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[:100])
    [truncated] = errors(check_path(tmp_path / "m.onnx"))
    assert "truncated" in truncated.fix
    data.unlink()
    [missing] = errors(check_path(tmp_path / "m.onnx"))
    assert "m.data" in missing.message and "missing" in missing.message


# -- the exported forms ----------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("attention", ["onnx", "decomposed"])
def test_exports_meant_for_tensorrt_pass(artifact, precision, attention):
    report = check_path(artifact(precision=precision, attention=attention))
    assert report.passed, report.text()
    assert not [f for f in report.findings if f.severity == "warning"], report.text()
    if attention == "onnx":
        assert report.ops["Attention"] == 2 and "RotaryEmbedding" not in report.ops


def test_gqa_export_fails_with_the_fix(artifact):
    report = check_path(artifact(precision="fp16", attention="gqa"))
    found = [f for f in errors(report) if f.op == "GroupQueryAttention"]
    assert len(found) == 2  # one GroupQueryAttention per layer of the tiny model
    assert all("--attention onnx" in f.fix for f in found)


def test_cli_exit_codes_and_json(artifact, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["check-trt", str(artifact(precision="fp16")), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["passed"] is True
    bad = runner.invoke(main, ["check-trt", str(artifact(precision="fp16", attention="gqa"))])
    assert bad.exit_code == 1
    assert "GroupQueryAttention" in bad.output and "fails (2 error(s))" in bad.output
    missing = runner.invoke(main, ["check-trt", str(tmp_path / "nope")])
    assert (
        missing.exit_code == 2 and "neither an artifact folder nor an .onnx file" in missing.output
    )
