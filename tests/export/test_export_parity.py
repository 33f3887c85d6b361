"""The exported graph against transformers' logits: every attention form, precision and variant."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qwen_deploy.parity.runner import run_parity
from tests.forms import forms

SMALL_VOCAB = 1024
ROWS = [[5, 17, 300, 42, 7, 999, 3, 64, 128], [11, 12, 13], [900, 1, 2, 3, 4, 5]]

# (id, checkpoint kwargs): GQA ratios 2/4/7, head_dim 64/128, tied, bf16, sharded, rope spellings
VARIANTS = [
    ("ratio2-hd16", dict(hidden=64, heads=4, kv_heads=2)),
    ("ratio4-hd64", dict(hidden=512, heads=8, kv_heads=2, intermediate=256)),
    ("ratio7-hd64", dict(hidden=448, heads=7, kv_heads=1, intermediate=256)),
    ("ratio2-hd128", dict(hidden=256, heads=2, kv_heads=1, intermediate=256)),
    (
        "ratio4-hd128-tied",
        dict(hidden=512, heads=4, kv_heads=1, intermediate=256, tie_word_embeddings=True),
    ),
    ("bf16-sharded", dict(dtype="bfloat16", max_shard_size="200KB")),
    ("rope-transformers4", dict(rope_spelling="transformers4", rope_theta=10000.0)),
]
FORMS = ["onnx", "gqa", "decomposed"]


def _ckpt(variant: dict) -> dict:
    return {"vocab": SMALL_VOCAB, "tokenizer": False, **variant}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_fp32_matches_transformers(artifact, checkpoint, name, variant, form):
    folder = artifact(_ckpt(variant), attention=form)
    report = run_parity(
        folder, checkpoint(**_ckpt(variant)), steps=8, token_rows=ROWS, progress=False
    )
    # prefill + 8 decode steps for each row alone and for the left-padded batch
    assert len(report.steps) == (len(ROWS) + 1) * 9
    assert report.summary["max_abs"] <= 1e-4, report.to_dict()["worst"]
    assert report.summary["top1"] == 1.0
    assert report.passed


@pytest.mark.parametrize("form", forms(FORMS, ["gqa"]))
def test_fp16_matches_transformers(artifact, tiny_checkpoint, form):
    folder = artifact({}, precision="fp16", attention=form)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    weight_types = {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert weight_types == {onnx.TensorProto.FLOAT16}
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    report = run_parity(folder, tiny_checkpoint, steps=8, progress=False)
    assert report.summary["top1"] >= 0.99
    assert report.summary["cosine_min"] >= 0.999
    assert report.passed, report.failures


def test_onnx_form_has_trt_importable_attention(tiny_artifact):
    """One standard Attention node per layer, 4D Q/K/V, no past_key/past_value inputs."""
    model = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == 2  # the tiny model's layers
    for node in attention:
        assert node.domain == ""
        assert len(node.input) == 4  # Q, K, V, attn_mask: no past_key / past_value
        assert [ranks[name] for name in node.input[:3]] == [4, 4, 4]
        assert len(node.output) == 1
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]


def test_graph_contract_names_and_dims(tiny_artifact):
    model = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in model.graph.input}
    outputs = {v.name: dims(v) for v in model.graph.output}
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["position_ids"] == ["batch_size", "sequence_length"]
    assert inputs["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert inputs["logits_to_keep"] == []  # optional: an initializer holds its default, 0
    default = next(t for t in model.graph.initializer if t.name == "logits_to_keep")
    assert onnx.numpy_helper.to_array(default) == 0
    assert outputs["logits"] == ["batch_size", "logits_length", 151936]
    assert outputs["present.0.key"] == ["batch_size", 2, "total_sequence_length", 16]
    assert len(inputs) == 3 + 2 * 2 + 1 and len(outputs) == 1 + 2 * 2
    # opset 23's own IR version, not the installed onnx's newest (onnxruntime 1.31 reads <= 13)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 23)]
    assert model.ir_version == 11
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert manifest["optional_inputs"] == [
        {"name": "logits_to_keep", "dtype": "int64", "shape": [], "default": 0}
    ]
    assert "logits_to_keep" not in [t["name"] for t in manifest["inputs"]]


def test_weights_stream_to_external_data(tiny_artifact):
    model_bytes = (tiny_artifact / "model.onnx").stat().st_size
    data_bytes = (tiny_artifact / "model.onnx.data").stat().st_size
    assert data_bytes > 50 * model_bytes
    model = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False)
    lm_head = next(t for t in model.graph.initializer if t.name == "lm_head.weight")
    assert lm_head.data_location == onnx.TensorProto.EXTERNAL
    assert list(lm_head.dims) == [64, 151936]  # stored transposed for MatMul(x, W^T)


def test_left_padded_batch_rows_equal_single_rows(artifact, checkpoint):
    from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(artifact(_ckpt({})))
    singles = []
    for row in ROWS:
        ids = np.array([row])
        singles.append(
            backend.forward(
                ids, np.ones_like(ids), np.arange(len(row))[None], backend.new_cache(1)
            )[0, -1]
        )
    width = max(map(len, ROWS))
    ids = np.zeros((len(ROWS), width), np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(ROWS):
        ids[b, width - len(row) :], mask[b, width - len(row) :] = row, 1
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    batched = backend.forward(ids, mask, positions, backend.new_cache(len(ROWS)))[:, -1]
    np.testing.assert_allclose(batched, np.stack(singles), atol=1e-5)
