"""quantize: INT8 weight-only and SmoothQuant artifacts stay close to fp32, and say how close.

The accuracy tests use init_std 0.05: the int8 artifacts' logit error relative to fp32 is then a
few percent, the order a trained model shows, while the conftest default (0.2) makes a random
2-layer model so chaotic that even fp32-compute INT8 weights move its logits by ~15%. That the
thresholds are not loose here is itself tested: a 10% error in one layer's scales fails them.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

from qwen_deploy.backends import open_backend
from qwen_deploy.cli import main
from qwen_deploy.errors import QwenDeployError
from qwen_deploy.manifest import MANIFEST, Manifest
from qwen_deploy.parity.metrics import compare_logits, merge_metrics
from qwen_deploy.parity.prompts import load_prompts
from qwen_deploy.quantize.calibration import collect_activations, load_calibration
from qwen_deploy.quantize.linears import find_linears
from qwen_deploy.quantize.quality import format_report, quality_report
from qwen_deploy.quantize.quantizer import quantize_artifact
from qwen_deploy.quantize.store import SourceTensors, load_graph
from qwen_deploy.quantize.text import prompt_ids
from qwen_deploy.runtime.decode import Batch
from qwen_deploy.runtime.onnxruntime_backend import (
    OnnxRuntimeBackend,
    create_session,
    session_options,
)
from tests.forms import forms
from tests.test_manifest import assert_round_trip

CALM = {"init_std": 0.05}
# cosine (worst row), top-1. SmoothQuant's per-layer alpha search lowers the mean error (what
# top-1 and perplexity see) with alphas of 0.9-1.0 on this outlier-free random model, which leaves
# its worst 64-token trajectory row at cosine ~0.983 (0.997 at alpha 0.5).
THRESHOLDS = {
    "int8-weight": (0.999, 0.95),
    "int8-dynamic": (0.999, 0.95),
    "int8-smoothquant": (0.98, 0.90),
}
PROMPTS = [  # with the held-out set: ~320 rows, so top-1 is not decided by a couple of near-ties
    {"messages": [{"role": "user", "content": "What moves the price of a 10-year bond?"}]},
    {"text": "The company's free cash flow fell 12% year over year, while revenue grew"},
    {"messages": [{"role": "user", "content": "某基金的夏普比率为1.2，这说明了什么？"}]},
]


@pytest.fixture(scope="module")
def quantized(artifact, tmp_path_factory):
    """quantized(mode, attention) -> (fp32 folder, int8 folder), built once per module."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def make(mode: str, attention: str) -> tuple[Path, Path]:
        if (mode, attention) not in cache:
            source = artifact(CALM, attention=attention)
            out = tmp_path_factory.mktemp("int8") / f"{mode}-{attention}"
            quantize_artifact(source, out, mode, progress=False)
            cache[mode, attention] = source, out
        return cache[mode, attention]

    return make


def trajectory_metrics(
    reference: Path, candidate: Path, steps: int = 8, prompts: list[dict] | None = None
) -> dict:
    """Prefill + `steps` greedy decode steps of the reference, fed to both; compare_logits per
    step (small arrays), merged."""
    ref, cand = OnnxRuntimeBackend(reference), OnnxRuntimeBackend(candidate)
    parts = []
    for ids in prompt_ids(reference, prompts or [*PROMPTS, *load_prompts()], 64):
        caches = ref.new_cache(1), cand.new_cache(1)
        tokens = np.array([ids])
        for _ in range(steps + 1):
            length = caches[0].length + tokens.shape[1]
            mask = np.ones((1, length), np.int64)
            pos = np.arange(caches[0].length, length)[None]
            r = ref.forward(tokens, mask, pos, caches[0])[0]
            c = cand.forward(tokens, mask, pos, caches[1])[0]
            parts.append((compare_logits(r, c), len(r)))
            tokens = np.array([[int(r[-1].argmax())]])
    return merge_metrics(parts)


@pytest.mark.parametrize(
    ("mode", "attention"),
    # the representative forms: the two the parity test below quantizes anyway
    forms(
        [
            ("int8-weight", "onnx"),
            ("int8-weight", "gqa"),
            ("int8-dynamic", "gqa"),
            ("int8-dynamic", "onnx"),
            ("int8-smoothquant", "onnx"),
            ("int8-smoothquant", "gqa"),
        ],
        [("int8-weight", "gqa"), ("int8-dynamic", "gqa"), ("int8-smoothquant", "onnx")],
    ),
)
def test_quantized_logits_stay_close_to_fp32(quantized, mode, attention):
    source, out = quantized(mode, attention)
    cosine, top1 = THRESHOLDS[mode]
    metrics = trajectory_metrics(source, out)
    assert metrics["cosine_min"] >= cosine and metrics["top1"] >= top1, metrics
    assert metrics["max_abs"] > 1e-3  # the weights really changed: this is not fp32 vs itself
    # the manifest's report measured the same thing on the held-out prompt set
    quality = Manifest.load(out).quality
    assert quality.passed and quality.failures == []
    assert quality.cosine_min >= cosine and quality.top1 >= top1
    assert quality.decode_steps == 8 and quality.cases == len(load_prompts())
    assert quality.perplexity["reference"] > 0
    assert abs(quality.perplexity["relative"]) < 0.01


@pytest.mark.parametrize(
    ("mode", "attention"), [("int8-weight", "gqa"), ("int8-smoothquant", "onnx")]
)
def test_quantized_artifacts_pass_parity_with_their_preset(
    checkpoint, quantized, tmp_path, mode, attention
):
    from qwen_deploy.parity.runner import run_parity

    prompts = tmp_path / "prompts.txt"  # two prompts: the left-padded batch case still runs
    prompts.write_text("What is a bond's duration?\n请解释市盈率。\n", encoding="utf-8")
    report = run_parity(
        quantized(mode, attention)[1], checkpoint(**CALM), prompts, steps=4, progress=False
    )
    assert report.preset == mode
    assert report.passed, report.failures
    assert any(s.case.startswith("batch") for s in report.steps)  # left padding included


def test_thresholds_catch_a_ten_percent_error_in_one_layer(quantized, tmp_path):
    """Negative control: the same check fails once one tensor's scales are off by 10%."""
    source, out = quantized("int8-weight", "gqa")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    model = onnx.load(str(broken / "model.onnx"), load_external_data=False)
    scale = next(
        t for t in model.graph.initializer if t.name == "model.layers.0.mlp.down_proj.weight.scale"
    )
    assert scale.data_location != TensorProto.EXTERNAL  # tiny: stored inline
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.1, scale.name))
    onnx.save_model(model, str(broken / "model.onnx"))
    Manifest.read(broken).save(broken)
    report = quality_report(source, broken, "int8-weight", progress=False)
    assert report.failed
    assert any(f.startswith(("mean KL", "mean cosine", "top1")) for f in report.failures)


def test_the_source_is_measured_again_only_when_it_changes(quantized, tmp_path):
    """A second report on the same source reuses its measurement and gives the same numbers;
    a changed source file is measured anew."""
    source, out = quantized("int8-weight", "gqa")
    copy = shutil.copytree(source, tmp_path / "source")
    report = functools.partial(quality_report, prompts=PROMPTS[:1], steps=2, progress=False)
    first = report(copy, out, "int8-weight")
    assert report(copy, out, "int8-weight") == first
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    norm = next(t for t in model.graph.initializer if t.name == "model.norm.weight")
    where = {e.key: e.value for e in norm.external_data}
    weights = np.memmap(copy / where["location"], np.uint8, "r+", int(where["offset"]))
    norm_bytes = weights[: int(where["length"])].view(np.float32)
    norm_bytes *= 2  # the final norm's weight doubled, in place
    weights.flush()
    changed = report(copy, out, "int8-weight")
    assert changed.perplexity["reference"] != first.perplexity["reference"]
    assert changed.kl_max > 10 * first.kl_max  # logits twice as sharp as the candidate's


def test_int8_codes_are_nearest_within_half_a_step():
    from qwen_deploy.quantize.smoothquant import quantize_per_channel
    from qwen_deploy.quantize.weight_only import quantize_blocks, quantize_rows

    rng = np.random.default_rng(0)
    w = rng.normal(size=(200, 48)).astype(np.float32)  # K = 200: the last block is padded
    w[:, 7] = 0.0  # a dead output channel
    w[3, 9] = 40.0  # an outlier only spoils its own block
    codes, scales = quantize_blocks(w, 64)
    assert codes.shape == (48, 4, 64) and scales.shape == (48, 4)
    step = np.repeat(scales, 64, axis=1)[:, :200].T
    dequant = ((codes.astype(np.float32) - 128) * scales[..., None]).reshape(48, -1)[:, :200].T
    assert np.all(np.abs(dequant - w) <= step / 2 + 1e-6)
    assert np.all(codes[7] == 128) and np.all(codes >= 1)  # symmetric: -127..127 around 128
    assert scales[9, 0] > 10 * scales[9, 1]
    codes, scales = quantize_per_channel(w)
    assert np.all(np.abs(codes * scales - w) <= scales / 2 + 1e-6) and scales[7] == 0
    rows, row_scales = quantize_rows(w)
    assert np.all(np.abs(rows * row_scales - w) <= row_scales / 2 + 1e-6)
    assert np.abs(codes).max() == 127 and codes.dtype == rows.dtype == np.int8


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The test's own unpacking: byte j holds codes 2j (low nibble) and 2j+1 (high nibble)."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def test_int4_range_search_beats_min_max_and_onnxruntime_reads_the_layout():
    import onnxruntime as ort
    from onnx import helper

    from qwen_deploy.quantize.weight_only import pack_nibbles, quantize_blocks_int4

    rng = np.random.default_rng(0)
    k, n, block = 200, 24, 32  # 7 blocks: K padded, an odd count of zero points per column
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[:, 5] = 0.0  # a dead output channel
    w[3, 9] = 40.0  # an outlier only spoils its own block
    codes, scales, zeros = quantize_blocks_int4(w, block)
    packed, packed_zp = pack_nibbles(codes), pack_nibbles(zeros).reshape(-1)
    assert packed.shape == (n, 7, block // 2) and packed.dtype == np.uint8
    assert scales.shape == (n, 7) and packed_zp.shape == (n * 4,)
    blocks = _unpack_nibbles(packed).reshape(n, 7, block).astype(np.float32)
    zp = _unpack_nibbles(packed_zp.reshape(n, -1))[:, :7].astype(np.float32)
    dequant = ((blocks - zp[..., None]) * scales[..., None]).reshape(n, -1)[:, :k].T
    assert np.all(dequant[:, 5] == 0) and scales[9, 0] > 5 * scales[9, 1]
    # per block, no worse than round-to-nearest on the plain min-max range, better in total
    padded = np.zeros((n, 7 * block), np.float32)
    padded[:, :k] = w.T
    padded = padded.reshape(n, 7, block)
    lo, hi = padded.min(-1), padded.max(-1)
    s = np.where(hi > lo, (hi - lo) / 15, 1.0)
    z = np.clip(np.rint(-lo / s), 0, 15)
    plain = (np.clip(np.rint(padded / s[..., None]) + z[..., None], 0, 15) - z[..., None]) * s[
        ..., None
    ]
    ours = dequant.T.reshape(n, -1)
    ours = np.concatenate([ours, np.zeros((n, 7 * block - k), np.float32)], 1).reshape(n, 7, -1)
    error, plain_error = np.square(ours - padded).sum(-1), np.square(plain - padded).sum(-1)
    assert np.all(error[:, :6] <= plain_error[:, :6] + 1e-6)  # the padded last block aside
    assert (error < plain_error - 1e-9).mean() > 0.2 and error.sum() < plain_error.sum()
    # onnxruntime reads the same layout: its MatMulNBits equals x @ (our dequantized weight)
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft",
        K=k, N=n, bits=4, block_size=block, accuracy_level=0,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [
            numpy_helper.from_array(packed, "b"),
            numpy_helper.from_array(scales, "s"),
            numpy_helper.from_array(packed_zp, "z"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    x = rng.normal(size=(3, k)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ dequant, atol=1e-3)


def test_int4_scale_refit_beats_every_shrunk_range():
    from qwen_deploy.quantize.weight_only import SHRINK, int4_grid

    w = np.random.default_rng(1).normal(size=(24, 7, 32)).astype(np.float32)

    def error(s, z):
        q = np.clip(np.rint(w / s[..., None]) + z[..., None], 0, 15) - z[..., None]
        return np.square(q * s[..., None] - w).sum(-1)

    lo, hi = w.min(-1), w.max(-1)
    ranges = []
    for fraction in SHRINK:  # each candidate range as found, without a refit
        span = (hi - lo) * fraction
        s = span / 15
        ranges.append(error(s, np.clip(np.rint(-(lo + (hi - lo - span) / 2) / s), 0, 15)))
    best_range, refit = np.min(ranges, axis=0), error(*int4_grid(w))
    assert np.all(refit <= best_range + 1e-6)
    assert (refit < best_range - 1e-6).mean() > 0.5 and refit.sum() < 0.99 * best_range.sum()


def test_gptq_lowers_the_output_error_and_is_nearest_rounding_without_correlation():
    from qwen_deploy.quantize.gptq import hessian
    from qwen_deploy.quantize.weight_only import int4_grid, quantize_blocks_int4

    rng = np.random.default_rng(0)
    k, n, block = 96, 40, 32
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = rng.normal(size=(2000, k)) @ rng.normal(size=(k, k)) * 0.3 + rng.normal(size=(2000, k))
    x[:, 7] = 0.0  # an input channel calibration never saw

    def output_error(h):
        codes, scales, zeros = quantize_blocks_int4(w, block, h)
        dequant = (codes.astype(np.float32) - zeros[..., None]) * scales[..., None]
        return np.square(x @ w - x @ dequant.reshape(n, -1)[:, :k].T).mean()

    # nothing to compensate through: the nearest codes on the range-searched grid
    codes, scales, zeros = quantize_blocks_int4(w, block, np.eye(k))
    blocks = w.T.reshape(n, k // block, block)
    grid = int4_grid(blocks, refit=False)
    assert np.array_equal(scales, grid[0]) and np.array_equal(zeros, grid[1])
    nearest = np.clip(np.rint(blocks / scales[..., None]) + zeros[..., None], 0, 15)
    assert np.array_equal(codes, nearest)
    assert output_error(hessian(x)) < 0.8 * output_error(None)


def test_cli_gptq_rounds_int4_differently_and_says_so(quantized, tmp_path, one_prompt):
    source, nearest = quantized("int4-weight", "onnx")
    out = tmp_path / "gptq"
    args = ["quantize", str(source), "-o", str(out), "--mode", "int4-weight", "--gptq", "--quiet"]
    args += ["--samples", "16", "--quality-prompts", str(one_prompt)]
    result = CliRunner().invoke(main, args)
    manifest = Manifest.load(out)  # the random model's gate verdict is beside the point here
    assert result.exit_code == (0 if manifest.quality.passed else 1), result.output
    assert manifest.quantization.rounding == "gptq"
    assert Manifest.load(nearest).quantization.rounding == "nearest"
    name = "model.layers.0.mlp.gate_up_proj.weight.int4"
    codes = [SourceTensors(o, load_graph(o, "model.onnx")).array(name) for o in (nearest, out)]
    assert codes[0].shape == codes[1].shape and (codes[0] != codes[1]).mean() > 0.05


@pytest.mark.parametrize(("bits", "block"), [(8, 64), (4, 32)])
def test_fused_siblings_equal_separate_kernels_bit_for_bit(tmp_path, bits, block):
    """q/k/v on one MatMulNBits (the biases side by side, zeros where a linear has none) and a
    Split give each linear exactly what its own MatMulNBits gives, at 1 and at several rows."""
    import onnxruntime as ort
    from onnx import helper

    from qwen_deploy.quantize.rewrite import GraphRewrite
    from qwen_deploy.quantize.store import TensorWriter
    from qwen_deploy.quantize.weight_only import fused_matmul_nbits, matmul_nbits

    rng = np.random.default_rng(0)
    k, widths = 96, {"q_proj": 64, "k_proj": 32, "v_proj": 32}
    weights = {r: rng.normal(size=(k, n)).astype(np.float32) for r, n in widths.items()}
    biased = ("q_proj", "v_proj")  # k_proj without one: its share of the fused bias is zeros

    def graph(folder: Path, fused: bool) -> str:
        folder.mkdir()
        writer = TensorWriter(folder, "model.onnx.data")
        nodes, tensors, outputs = [], [], []
        for role, w in weights.items():
            name = f"model.layers.0.self_attn.{role}"
            nodes.append(helper.make_node("MatMul", ["x", name + ".weight"], [role + "_mm"]))
            tensors.append(writer.tensor(name + ".weight", w))
            y = role + "_mm"
            if role in biased:
                bias = rng.normal(size=w.shape[1]).astype(np.float32)
                tensors.append(writer.tensor(name + ".bias", bias))
                nodes.append(helper.make_node("Add", [y, name + ".bias"], [role]))
                y = role
            outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["M", w.shape[1]]))
        model = helper.make_model(
            helper.make_graph(
                nodes,
                "siblings",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                outputs,
                tensors,
            ),
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        )
        writer.close()
        writer = TensorWriter(folder, "quantized.onnx.data")
        rw = GraphRewrite(model, SourceTensors(folder, model), writer)
        lins = find_linears(model.graph)
        if fused:
            new = fused_matmul_nbits(
                rw, lins, "x", lambda lin: weights[lin.role], block=block, bits=bits
            )
            rw.replace(lins[0].matmul, new)
            for lin in lins[1:]:
                rw.replace(lin.matmul, [])
        else:
            for lin in lins:
                node = matmul_nbits(rw, lin, "x", weights[lin.role], block=block, bits=bits)
                rw.replace(lin.matmul, [node])
        rw.finish()
        writer.close()
        assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == (1 if fused else 3)
        onnx.save_model(model, str(folder / "model.onnx"))
        return str(folder / "model.onnx")

    rng_state = rng.bit_generator.state
    separate = ort.InferenceSession(graph(tmp_path / "separate", False))
    rng.bit_generator.state = rng_state  # the same biases
    fused = ort.InferenceSession(graph(tmp_path / "fused", True))
    for rows in (1, 5):
        x = {"x": rng.normal(size=(rows, k)).astype(np.float32)}
        for a, b in zip(separate.run(None, x), fused.run(None, x), strict=True):
            np.testing.assert_array_equal(a, b)


def test_int4_weight_graph_is_int4_but_an_int8_head_and_embedding(quantized):
    from qwen_deploy.quantize.weight_only import INT8_ROLES

    source, out = quantized("int4-weight", "onnx")
    spec = Manifest.load(source).model
    nbits = [n for n in _nodes(out) if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    bits = {n.name.split("/")[0]: a["bits"] for n, a in zip(nbits, attrs, strict=True)}
    # q and k share one INT4 kernel, gate and up another; v, o, down and the head have their own
    assert len(bits) == 5 * spec.num_layers + 1
    roles = {name: name.rsplit(".", 1)[-1] for name in bits}
    assert {"q_k_proj", "gate_up_proj", "v_proj", "o_proj", "down_proj"} <= set(roles.values())
    assert {bits[n] for n, role in roles.items() if role in INT8_ROLES} == {8}  # head, v, down
    assert {bits[n] for n, role in roles.items() if role not in INT8_ROLES} == {4}
    assert {a["block_size"] for a in attrs if a["bits"] == 4} == {32}
    assert {a["accuracy_level"] for a in attrs} == {4}
    assert all(n.input[3] for n, a in zip(nbits, attrs, strict=True) if a["bits"] == 4)  # zero pts
    types = _initializer_types(out)
    assert types["model.embed_tokens.weight.int8"] == TensorProto.INT8
    assert types["model.layers.0.mlp.gate_up_proj.weight.int4"] == TensorProto.UINT8
    assert types["model.layers.0.mlp.down_proj.weight.int8"] == TensorProto.UINT8
    q = Manifest.load(out).quantization
    assert q.mode == "int4-weight" and q.bits == 4 and q.block_size == 32
    assert q.lm_head == "int8, block 64" and q.int8_roles == list(INT8_ROLES)


@pytest.mark.parametrize(
    ("mode", "attention"),
    [
        ("int8-weight", "gqa"),
        ("int8-dynamic", "gqa"),
        ("int4-weight", "onnx"),
        ("int8-smoothquant", "onnx"),
    ],
)
def test_quantized_manifest_reads_as_records_and_round_trips(quantized, mode, attention):
    """Each mode's scheme and report load as typed records and write back byte for byte (each
    mode records its own details, in its own order)."""
    manifest = assert_round_trip(quantized(mode, attention)[1] / MANIFEST)
    q, quality = manifest.quantization, manifest.quality
    assert q.mode == manifest.quantization_mode == quality.preset == mode
    assert q.calibration["samples"] > 0 and q.smoothing["alphas"]
    assert (q.format == "QDQ") == (mode == "int8-smoothquant")
    assert (q.rounding == "nearest") == (mode == "int4-weight")  # only int4 records a rounding
    assert quality.gate["top1"] > 0 and "alphas" in quality.layers
    assert quality.failed == (not quality.passed)


def test_quality_metrics_chunked_like_compare_logits():
    from qwen_deploy.quantize.quality import _compare

    rng = np.random.default_rng(0)
    a = rng.normal(size=(37, 500)).astype(np.float32)
    b = a + rng.normal(scale=0.3, size=a.shape).astype(np.float32)
    whole, chunked = compare_logits(a, b), _compare(a, b)
    assert chunked == pytest.approx(whole, rel=1e-12)


def _nodes(folder: Path) -> list[onnx.NodeProto]:
    return list(load_graph(folder, "model.onnx").graph.node)


def _initializer_types(folder: Path) -> dict[str, int]:
    return {t.name: t.data_type for t in load_graph(folder, "model.onnx").graph.initializer}


def test_int8_weight_graph_quantizes_every_linear_head_and_embedding(quantized):
    source, out = quantized("int8-weight", "gqa")
    spec = Manifest.load(source).model
    nodes = _nodes(out)
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * spec.num_layers + 1  # q/k/v and gate/up fused: one kernel each
    assert not [n for n in nodes if n.op_type == "MatMul"]
    assert {
        onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"
    } == {8}
    types = _initializer_types(out)
    assert types["model.embed_tokens.weight.int8"] == TensorProto.INT8
    assert "model.embed_tokens.weight" not in types and "lm_head.weight" not in types
    # q/k/v are one node, their biases folded into it
    qkv = [n for n in nbits if n.name.split("/")[0].endswith(".q_k_v_proj")]
    assert len(qkv) == spec.num_layers and all(len(n.input) == 6 and n.input[5] for n in qkv)
    assert not any(n.op_type == "Add" and n.input[1].endswith("_proj.bias") for n in nodes)
    manifest = Manifest.load(out)
    q = manifest.quantization
    assert q.mode == "int8-weight" and q.lm_head and q.embedding == "int8 per row"
    assert q.block_size == 64 and manifest.row_independent_kernels  # the default block
    assert manifest.source == Manifest.load(source).source
    assert manifest.data_files == ["model.onnx.data"]
    for name in [*manifest.tokenizer_files, "config.json", "generation_config.json"]:
        assert (out / name).is_file(), name


def test_int8_dynamic_graph_runs_every_linear_on_the_integer_gemm(quantized):
    source, out = quantized("int8-dynamic", "gqa")
    spec = Manifest.load(source).model
    nodes = _nodes(out)
    integer = [n for n in nodes if n.op_type == "MatMulInteger"]
    assert len(integer) == 6 * spec.num_layers + 1 and not any(
        "down_proj" in n.name for n in integer
    )
    # down_proj keeps per-block activation scales (its input's spikes)
    blockwise = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(blockwise) == spec.num_layers and all("down_proj" in n.name for n in blockwise)
    assert not [n for n in nodes if n.op_type == "MatMul"]
    # one run-time quantization per shared input: q/k/v, o, gate/up per layer, the head
    assert len([n for n in nodes if n.op_type == "QuantizeLinear"]) == 3 * spec.num_layers + 1
    types = _initializer_types(out)
    assert types["model.layers.0.self_attn.q_proj.weight.int8"] == TensorProto.INT8
    assert types["model.layers.0.mlp.down_proj.weight.int8"] == TensorProto.UINT8  # MatMulNBits
    assert types["lm_head.weight.int8"] == TensorProto.INT8
    assert types["model.embed_tokens.weight.int8"] == TensorProto.INT8
    q = Manifest.load(out).quantization
    assert q.mode == "int8-dynamic" and q.op.startswith("MatMulInteger") and q.lm_head
    assert q.activations == "int8 per row (token), quantized at run time"
    assert q.block_size == 64  # down_proj's MatMulNBits, by default


def test_int8_dynamic_rows_do_not_depend_on_their_batch_mates(quantized):
    """Each row is quantized with its own scale and the integer products are exact: a row's
    logits beside another row, or as part of a longer prefill, equal its own run's bit for bit."""
    _, out = quantized("int8-dynamic", "gqa")
    backend = OnnxRuntimeBackend(out)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (2, 6))

    def logits(rows: np.ndarray) -> np.ndarray:
        mask = np.ones(rows.shape, np.int64)
        positions = np.broadcast_to(np.arange(rows.shape[1]), rows.shape)
        return backend.forward(rows, mask, positions, backend.new_cache(len(rows)))

    together, alone = logits(ids), logits(ids[:1])
    assert np.array_equal(together[0], alone[0])
    assert not np.array_equal(together[0], together[1])  # the rows are different prompts
    # the same prompt's first positions, as a shorter prefill: its rows equal the longer one's
    assert np.array_equal(logits(ids[:1, :4])[0], alone[0, :4])


def test_smoothquant_graph_is_explicit_qdq_for_tensorrt(quantized):
    from qwen_deploy.tensorrt.preflight import check_path

    source, out = quantized("int8-smoothquant", "onnx")
    model = load_graph(out, "model.onnx")
    graph, tensors = model.graph, SourceTensors(out, model)
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    matmuls = [
        n
        for n in graph.node
        if n.op_type == "MatMul"
        and n.input[1] in producer
        and producer[n.input[1]].op_type == "DequantizeLinear"
    ]
    assert len(matmuls) == len(find_linears(load_graph(source, "model.onnx").graph))
    for mm in matmuls:
        act, weight = producer[mm.input[0]], producer[mm.input[1]]
        assert act.op_type == "DequantizeLinear"
        assert producer[act.input[0]].op_type == "QuantizeLinear"
        assert inits[weight.input[0]].data_type == TensorProto.INT8
        assert onnx.helper.get_attribute_value(weight.attribute[0]) == 1  # axis: output channel
        assert np.all(tensors.array(weight.input[2]) == 0)
        assert tensors.array(act.input[1]).shape == ()  # per-tensor activation scale
        assert tensors.array(act.input[2]).dtype == np.int8 and tensors.array(act.input[2]) == 0
    assert check_path(out).passed
    q = Manifest.load(out).quantization
    assert q.format == "QDQ" and q.bits is None  # per mode: weight-only records bits instead
    assert q.smoothing["kept_float"] == []  # no outlier layers in a random model
    assert q.calibration["source"].endswith("calibration.jsonl")
    assert q.calibration["samples"] == len(load_calibration(None, 10_000)[0])
    assert q.smoothing["alpha"] == "searched per group"


def test_onnxruntime_cpu_runs_every_smoothquant_linear_as_an_integer_matmul(quantized, tmp_path):
    """The backend's session fuses each Q/DQ unit into MatMulIntegerToFloat: none is left to
    dequantize its weight on every step (the real 0.5B decoded ~7x slower with 120 of them)."""
    source, out = quantized("int8-smoothquant", "onnx")
    options = session_options(None)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    create_session(out, Manifest.load(out), options, "cpu")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    ops = [n.op_type for n in optimized.graph.node]
    assert "DequantizeLinear" not in ops
    linears = len(find_linears(load_graph(source, "model.onnx").graph))
    assert ops.count("MatMulIntegerToFloat") == linears


def _inject_outliers(src: Path, dst: Path, factor: float = 20.0) -> Path:
    """The same function with activation outliers: channel j of a linear layer's input scaled by
    `factor` where it is produced, the weights reading it divided by `factor`. Covers every fold:
    norm weights (q/k/v, gate/up, lm_head), up_proj -> down_proj, v_proj -> o_proj."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    file = next(dst.glob("*.safetensors"))
    t = {k: v.copy() for k, v in load_file(file).items()}
    cfg = json.loads((dst / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    groups = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    ch = [3, 17, 40]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm, users in (
            ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
            ("post_attention_layernorm", ("gate_proj", "up_proj")),
        ):
            t[p + norm + ".weight"][ch] *= factor
            for u in users:
                t[p + ("self_attn." if u[0] in "qkv" else "mlp.") + u + ".weight"][:, ch] /= factor
        t[p + "mlp.up_proj.weight"][ch] *= factor
        t[p + "mlp.down_proj.weight"][:, ch] /= factor
        v_ch = [1, 5]  # dims of kv head 0, read by query heads 0 .. groups-1
        t[p + "self_attn.v_proj.weight"][v_ch] *= factor
        t[p + "self_attn.v_proj.bias"][v_ch] *= factor
        for h in range(groups):
            t[p + "self_attn.o_proj.weight"][:, [h * head_dim + d for d in v_ch]] /= factor
    t["model.norm.weight"][ch] *= factor
    t["lm_head.weight"][:, ch] /= factor
    save_file(t, file, metadata={"format": "pt"})
    return dst


def test_smoothing_absorbs_activation_outliers(checkpoint, quantized, tmp_path, one_prompt):
    """Outlier channels (x20) that do not change the fp32 function leave the INT8 result as good
    as without them: smoothing moves them into the weights (alpha 0.5 undoes them exactly)."""
    from qwen_deploy.export import export_checkpoint

    ckpt = _inject_outliers(checkpoint(**CALM), tmp_path / "ckpt")
    fp32 = tmp_path / "fp32"
    export_checkpoint(ckpt, fp32, attention="gqa", progress=False)
    source = quantized("int8-weight", "gqa")[0]
    assert trajectory_metrics(source, fp32, 2, PROMPTS)["max_abs"] < 1e-3  # same function
    graph = load_graph(fp32, "model.onnx").graph
    qkv_input = next(x for x in find_linears(graph) if x.role == "q_proj").input
    absmax = collect_activations(fp32, [qkv_input], load_calibration(None, 8)[0], False).absmax
    assert absmax[qkv_input].max() > 10 * np.median(absmax[qkv_input])  # real outliers
    for mode in ("int8-smoothquant", "int8-weight"):
        out = tmp_path / mode
        quantize_artifact(fp32, out, mode, quality_prompts=one_prompt, progress=False)
        cosine = THRESHOLDS[mode][0]
        with_outliers = trajectory_metrics(source, out, 4, PROMPTS)
        without = trajectory_metrics(source, quantized(mode, "gqa")[1], 4, PROMPTS)
        assert with_outliers["cosine_min"] >= max(cosine, without["cosine_min"] - 3e-4), mode
        assert with_outliers["top1"] >= without["top1"] - 0.03, mode
        folds = Manifest.load(out).quantization.smoothing["folded_into"]
        assert folds == {"norm": 5, "mul": 2, "up_proj": 2}


@pytest.fixture
def one_prompt(tmp_path) -> Path:
    """A one-prompt quality set: for tests where the quality numbers are not the point."""
    path = tmp_path / "held_out.txt"
    path.write_text("What is the yield of a bond bought below par?\n", encoding="utf-8")
    return path


def test_calibration_is_deterministic(artifact, tmp_path, one_prompt):
    source = artifact(CALM, attention="gqa")
    data = []
    for run in ("first", "second"):
        quantize_artifact(
            source,
            tmp_path / run,
            "int8-smoothquant",
            samples=12,
            quality_prompts=one_prompt,
            progress=False,
        )
        data.append((tmp_path / run / "model.onnx.data").read_bytes())
    assert data[0] == data[1]
    graph = load_graph(source, "model.onnx").graph
    names = sorted({x.input for x in find_linears(graph)})
    prompts = load_calibration(None, 4)[0]
    first = collect_activations(source, names, prompts, False).absmax
    second = collect_activations(source, names, prompts[::-1], False).absmax  # any order
    for name in names:
        np.testing.assert_array_equal(first[name], second[name])


def test_calibration_files_txt_and_jsonl(artifact, tmp_path, one_prompt):
    source = artifact(CALM, attention="gqa")
    txt = tmp_path / "prompts.txt"
    txt.write_text("What is a bond?\n\n资产负债率是什么？\nExplain EBITDA.\n", encoding="utf-8")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(
        json.dumps({"text": "raw text, no template"})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        )
        + "\n",
        encoding="utf-8",
    )
    prompts, origin = load_calibration(txt, 128)
    assert [p["messages"][0]["content"] for p in prompts][1] == "资产负债率是什么？"
    assert len(prompts) == 3 and origin == str(txt.resolve())
    assert len(load_calibration(jsonl, 1)[0]) == 1
    out = tmp_path / "sq"
    quantize_artifact(
        source,
        out,
        "int8-smoothquant",
        calibration=jsonl,
        alpha=0.8,
        quality_prompts=one_prompt,
        progress=False,
    )
    q = Manifest.load(out).quantization
    assert q.calibration == {"source": str(jsonl.resolve()), "samples": 2}
    assert q.smoothing["alpha"] == 0.8


def test_default_calibration_set_is_varied_and_held_out():
    prompts, _ = load_calibration(None, 10_000)
    assert 64 <= len(prompts) <= 128
    texts = [m["content"] for p in prompts for m in p["messages"]]
    assert sum(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts) >= 20  # Chinese
    assert sum(t.isascii() for t in texts) >= 40  # English
    assert any(m["role"] == "assistant" for p in prompts for m in p["messages"])
    held_out = {m["content"] for p in load_prompts() for m in p["messages"]}
    assert not held_out & set(texts)


def _no_output(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "int4"}, "mode 'int4' is not one of"),
        ({"alpha": 1.5}, "--alpha must be within [0, 1]"),
        ({"alpha": -0.1}, "--alpha must be within [0, 1]"),
        ({"samples": 0}, "--samples must be at least 1"),
        ({"gptq": True}, "--gptq applies to --mode int4-weight only"),
        ({"block_size": 64}, "--block-size applies to --mode int4-weight, int8-weight, "),
        (
            {"mode": "int4-weight", "block_size": 48},
            "--block-size for int4-weight must be one of 32, 64, 128",
        ),
        (
            {"mode": "int8-dynamic", "block_size": 32},
            "--block-size for int8-dynamic must be one of 64, 128",
        ),
        ({"calibration": "missing.jsonl"}, "does not exist"),
        ({"calibration": "prompts.csv"}, "must be .txt"),
        ({"calibration": "bad.jsonl"}, "line 2 is not valid JSON"),
        ({"calibration": "empty.txt"}, "holds no prompts"),
        ({"quality_prompts": "missing.txt"}, "does not exist"),
    ],
)
def test_bad_input_is_refused_before_any_output(artifact, tmp_path, kwargs, message):
    source = artifact(CALM, attention="gqa")
    (tmp_path / "prompts.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    kwargs = {"mode": "int8-smoothquant", **kwargs}
    for key in ("calibration", "quality_prompts"):
        if key in kwargs:
            kwargs[key] = tmp_path / kwargs[key]
    out = tmp_path / "out"
    with pytest.raises(QwenDeployError, match=message.replace("[", r"\[").replace("]", r"\]")):
        quantize_artifact(source, out, progress=False, **kwargs)
    assert _no_output(out)


def test_cli_errors_missing_artifact_existing_output_and_quantized_source(quantized, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        main, ["quantize", str(tmp_path / "nope"), "-o", str(out), "--mode", "int8-weight"]
    )
    assert result.exit_code == 2 and "does not exist" in result.stderr and _no_output(out)
    source, done = quantized("int8-weight", "gqa")
    out.mkdir()
    result = runner.invoke(main, ["quantize", str(source), "-o", str(out), "--mode", "int8-weight"])
    assert result.exit_code == 2 and "pass --force" in result.stderr
    assert list(out.iterdir()) == []
    result = runner.invoke(
        main, ["quantize", str(done), "-o", str(tmp_path / "twice"), "--mode", "int8-smoothquant"]
    )
    assert result.exit_code == 2 and "already quantized" in result.stderr
    assert _no_output(tmp_path / "twice")


def test_cli_prints_the_quality_report(artifact, tmp_path, one_prompt):
    source = artifact(CALM, attention="gqa")
    out = tmp_path / "w8"
    result = CliRunner().invoke(
        main,
        [
            "quantize",
            str(source),
            "-o",
            str(out),
            "--mode",
            "int8-weight",
            "--samples",
            "8",
            "--quality-prompts",
            str(one_prompt),
            "--json",
            "--quiet",
        ],
    )
    report = json.loads(result.stdout)  # one prompt's 27 rows: one flip moves top-1 by 0.037
    assert result.exit_code == (0 if report["passed"] else 1), result.output
    manifest = Manifest.load(out)
    assert report == manifest.quality.to_dict() and report["cases"] == 1
    assert manifest.quality.prompts == "given"
    assert manifest.quantization.calibration["samples"] == 8
    text = format_report(manifest.quality)
    assert f"top-1 agreement  {report['top1']:.4f}" in text
    assert ("preset int8-weight: pass" in text) == report["passed"]


def test_a_failing_gate_exits_1_and_keeps_the_artifact_marked_failed(checkpoint, tmp_path):
    """Outlier channels (x20) left unsmoothed (--alpha 0) and no layer kept in floating point:
    top-1 falls under the gate's 0.95, and the CLI says so, names the options, and exits 1."""
    from qwen_deploy.export import export_checkpoint

    fp32 = tmp_path / "fp32"
    ckpt = _inject_outliers(checkpoint(**CALM), tmp_path / "ckpt")
    export_checkpoint(ckpt, fp32, attention="gqa", progress=False)
    out = tmp_path / "bad"
    args = ["quantize", str(fp32), "-o", str(out), "--mode", "int8-smoothquant", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--alpha", "0", "--keep-float", "0"])
    assert result.exit_code == 1, result.output
    assert "quality gate int8-smoothquant FAILED: top1 " in result.stderr
    assert "--keep-float" in result.stderr and "--alpha auto" in result.stderr
    quality = Manifest.load(out).quality  # kept, marked failed
    assert quality.failed and quality.failures[0].startswith("top1")
    assert "preset int8-smoothquant: FAIL: top1" in result.stdout
    assert (out / "model.onnx").is_file() and quality.layers["kept_float"] == []
    assert set(quality.layers["alphas"].values()) == {0.0}
    result = CliRunner().invoke(main, [*args, "--force"])  # the defaults pass on the same model
    assert result.exit_code == 0, result.output


def test_rows_with_a_context_seen_before_count_once():
    """Prompts sharing the template's opening rows: each context is one row of the statistics."""
    from qwen_deploy.quantize.quality import distinct_rows

    ids, fed = [[1, 2, 3], [1, 2, 4], [1, 2, 3]], [[5, 7], [5, 7], [6, 7]]
    first = [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]
    # prompt 2 leaves prompt 1 at position 2; prompt 3 repeats it until its first decode step
    assert distinct_rows(ids, fed) == [*first, (1, 2), (1, 3), (1, 4), (2, 3), (2, 4)]


def test_gate_failures_come_worst_first():
    from qwen_deploy.quantize.quality import gate_bounds, gate_failures

    bounds = gate_bounds("int8-smoothquant")
    good = {"top1": 1.0, "cosine_mean": 1.0, "kl_mean": 0.0}
    assert gate_failures("int8-smoothquant", good, 0.0) == []
    low = {**good, "top1": bounds["top1"] - 0.01}
    assert gate_failures("int8-smoothquant", low, 0.0) == [f"top1 {low['top1']:.4f} < 0.95"]
    # 8x the allowed perplexity increase comes before a top-1 1.2x its allowed loss
    low["top1"] = 1 - 1.2 * (1 - bounds["top1"])
    assert gate_failures("int8-smoothquant", low, 8 * bounds["perplexity"]) == [
        f"perplexity {8 * bounds['perplexity']:+.2%} > +{bounds['perplexity']:.1%}",
        f"top1 {low['top1']:.4f} < 0.95",
    ]
    # the means over rows: 3x the allowed cosine loss before 2x the allowed KL
    drifted = {**good, "kl_mean": 2 * bounds["kl"], "cosine_mean": 1 - 3 * (1 - bounds["cosine"])}
    assert [f.split()[:2] for f in gate_failures("int8-smoothquant", drifted, 0.0)] == [
        ["mean", "cosine"],
        ["mean", "KL"],
    ]


# a value each option named by a failed gate's advice takes (None: a flag)
ADVICE_VALUES = {"--alpha": "0.3", "--keep-float": "0.2", "--block-size": "64", "--gptq": None}


@pytest.mark.parametrize("mode", ["int8-weight", "int8-dynamic", "int4-weight", "int8-smoothquant"])
def test_gate_advice_names_only_options_the_mode_takes(tmp_path, mode):
    """Every option a failed gate suggests exists and is accepted with that mode: the command
    gets past its option checks to the (missing) artifact."""
    import re

    from qwen_deploy.quantize.quality import ADVICE

    calibration = tmp_path / "calibration.txt"
    calibration.write_text("What is a bond?\n", encoding="utf-8")
    named = set(re.findall(r"--[a-z][a-z0-9-]*", ADVICE[mode])) - {"--mode"}
    assert named, ADVICE[mode]
    known = {opt for p in main.commands["quantize"].params for opt in p.opts}
    assert named <= known, named - known
    for option in named:
        value = str(calibration) if option == "--calibration" else ADVICE_VALUES[option]
        args = ["quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]
        args += ["--mode", mode, option] + ([] if value is None else [value])
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and "applies to --mode" not in result.output, result.output
        assert "missing" in result.output, (option, result.output)


def test_search_prefers_the_alpha_that_tames_an_outlier_channel():
    from qwen_deploy.quantize.search import choose_alpha, keep_float, output_error

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(256, 64)).astype(np.float32)
    rows[:, 5] *= 50.0  # one outlier channel
    weight = rng.normal(size=(64, 32)).astype(np.float32) / 8
    act_max, weight_max = np.abs(rows).max(axis=0), np.abs(weight).max(axis=1)
    choice = choose_alpha(rows, weight, act_max, weight_max)
    assert choice.alpha >= 0.5
    assert choice.error < output_error(rows, weight, act_max, weight_max, 0.0) / 10
    # scores: multiples of the median group's error
    scores = {"a": 50.0, "b": 20.0, "big": 900.0, **{f"ok{i}": 1.0 for i in range(5)}}
    params = {"a": 10, "b": 10, "big": 70, **{f"ok{i}": 2 for i in range(5)}}
    assert keep_float(scores, params, 0.3) == ["a", "b"]  # big does not fit, ok* are ordinary
    assert keep_float(scores, params, 0.0) == []
    assert keep_float({n: 1.0 for n in params}, params, 0.5) == []  # no outliers: all INT8


# The real Qwen2.5-Coder-0.5B- and 1.5B-Instruct (make real-model, make real-model-2): each mode
# quantized once per model with default options through the CLI, except a calibration set cut to
# its first REAL_SAMPLES prompts (~3.5k tokens, a quarter of the default) to keep these tests at
# minutes on two cores. CI runs one passing gate (int8-weight on the 0.5B, the cheapest) and the
# failing one; the other modes and the 1.5B's gates (7-12 minutes each here) are exhaustive.
REAL_SAMPLES = 32
MODELS = ("0.5b", "1.5b")


@pytest.fixture(scope="module")
def real_quantized(real_artifact, tmp_path_factory):
    """real_quantized(mode, model) -> (CLI result, quantized folder), once per module."""
    cache: dict[tuple[str, str], tuple] = {}

    def make(mode: str, model: str = "0.5b"):
        if (mode, model) not in cache:
            out = tmp_path_factory.mktemp("real-quantized") / mode
            args = ["quantize", str(real_artifact(model)), "-o", str(out), "--mode", mode]
            result = CliRunner().invoke(
                main, [*args, "--samples", str(REAL_SAMPLES), "--quiet", "--json"]
            )
            cache[mode, model] = result, out
        return cache[mode, model]

    return make


def _passed_quality(real_quantized, mode: str, model: str) -> tuple[dict, Path]:
    """The CLI's quality report of `mode` on the real `model`, asserted to exit 0 and pass
    every bound of its gate."""
    result, out = real_quantized(mode, model)
    assert result.exit_code == 0, result.output
    quality = json.loads(result.stdout)
    assert quality["passed"], quality["failures"]
    gate = quality["gate"]
    assert (
        quality["top1"] >= gate["top1"] and quality["perplexity"]["relative"] <= gate["perplexity"]
    )
    assert quality["kl_mean"] <= gate["kl"] and quality["cosine_mean"] >= gate["cosine"]
    # the extremes are reported with where they are, not judged
    assert quality["kl_max"] >= quality["kl_mean"] and quality["largest_kl_row"]["prompt"] >= 1
    return quality, out


@pytest.mark.real
@pytest.mark.parametrize("model", forms(list(MODELS), []))
def test_real_smoothquant_passes_its_gate_with_default_options(real_quantized, model):
    from qwen_deploy.tensorrt.preflight import check_path

    quality, out = _passed_quality(real_quantized, "int8-smoothquant", model)
    assert quality["perplexity"]["tokens"] > 2000 and quality["cases"] == len(load_prompts())
    layers = quality["layers"]
    assert layers["int8_weight_fraction"] >= 0.85
    assert layers["alpha"] == "searched per group" and len(layers["alphas"]) >= 80
    kept = layers["kept_float"]  # the outlier layers: down_proj, each with its measured reason
    assert kept and all(k["linears"].endswith("mlp.down_proj") for k in kept)
    assert all(k["reason"].startswith("INT8 error") for k in kept)
    assert check_path(out).passed  # static per-tensor activations, per-channel weights, Q/DQ


@pytest.mark.real
@pytest.mark.parametrize("model", forms(list(MODELS), ["0.5b"]))
def test_real_int8_weight_passes_its_gate_with_default_options(real_quantized, model):
    quality, _ = _passed_quality(real_quantized, "int8-weight", model)
    assert quality["layers"]["int8_weight_fraction"] == 1.0


@pytest.mark.real
@pytest.mark.parametrize("model", forms(list(MODELS), []))
def test_real_int8_dynamic_passes_its_gate_with_default_options(real_quantized, model):
    _, out = _passed_quality(real_quantized, "int8-dynamic", model)
    assert Manifest.load(out).quantization.activations.startswith("int8 per row")


@pytest.mark.real
@pytest.mark.parametrize("model", forms(list(MODELS), []))
def test_real_int4_weight_passes_its_gate_with_default_options(real_quantized, model):
    """INT4 but for the LM head, v_proj and down_proj (measured on the 0.5B: all-INT4 0.906,
    +5.8%)."""
    _passed_quality(real_quantized, "int4-weight", model)
    _, int4 = real_quantized("int4-weight", model)
    _, int8 = real_quantized("int8-weight", model)
    sizes = [sum(f.stat().st_size for f in o.glob("model.onnx*")) for o in (int4, int8)]
    assert sizes[0] < 0.9 * sizes[1]


@pytest.mark.real
@pytest.mark.parametrize("model", forms(list(MODELS), ["0.5b"]))
def test_real_smoothquant_without_smoothing_or_fallback_fails_its_gate(
    real_artifact, tmp_path, model
):
    """On the trained models the naive scheme (no smoothing: --alpha 0; every layer INT8:
    --keep-float 0) breaks them (docs/DESIGN.md, "Precisions"): the gate says so, names the
    options to try and exits 1, and the artifact is kept marked failed."""
    out = tmp_path / "naive"
    args = ["quantize", str(real_artifact(model)), "-o", str(out), "--mode", "int8-smoothquant"]
    args += ["--alpha", "0", "--keep-float", "0", "--samples", str(REAL_SAMPLES), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "quality gate int8-smoothquant FAILED: " in result.stderr
    assert "--alpha auto" in result.stderr and "--keep-float" in result.stderr
    quality = Manifest.load(out).quality
    assert quality.failed and quality.top1 < 0.95
    assert quality.layers["int8_weight_fraction"] == 1.0


def test_size_estimates_match_the_quantized_artifacts(quantized):
    """memory.artifact_estimate, which the refusals quote, against what quantize writes."""
    from qwen_deploy import memory

    for mode, attention in (("int8-weight", "gqa"), ("int4-weight", "onnx")):
        source, out = quantized(mode, attention)
        for folder, form in ((source, "fp32"), (out, mode)):
            manifest = Manifest.load(folder)
            data = (folder / manifest.data_files[0]).stat().st_size
            assert memory.artifact_estimate(manifest.model, form) == pytest.approx(data, rel=0.03)


def test_quantize_that_cannot_fit_is_refused_before_any_output(artifact, tmp_path):
    source = artifact(CALM, attention="gqa")
    out = tmp_path / "out"
    args = ["quantize", str(source), "-o", str(out), "--mode", "int4-weight", "--gptq"]
    result = CliRunner().invoke(main, [*args, "--max-memory", "0.05"])
    assert result.exit_code == 2 and _no_output(out)
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("error: quantize needs about ")
    assert "source artifact" in message and "quality logits" in message
    assert "0.1 GB allowed by --max-memory" in message
    # what would need less: nearest rounding, and an fp16 source for an fp32 one
    assert "without --gptq (about" in message and "export --precision fp16" in message


def test_an_fp16_source_quantizes_to_an_artifact_that_matches_it(artifact, tmp_path, one_prompt):
    """The route for a model too large for fp32 (docs/DESIGN.md, Memory). Its MatMulNBits scales
    are fp16 in the file: the CPU must read them as constants (it computed zeros from scales
    widened at run time)."""
    source = artifact(CALM, precision="fp16", attention="gqa")
    out = tmp_path / "int4"
    manifest = quantize_artifact(
        source, out, "int4-weight", samples=2, quality_prompts=one_prompt, progress=False
    )
    quality = manifest.quality  # the tiny model's int4 misses the top-1 floor from fp32 too
    assert quality.reference_precision == "fp16" and quality.cosine_mean > 0.99
    ids = np.array([[11, 22, 33, 44, 55]])
    logits = {}
    for folder in (source, out):
        backend = open_backend(folder)
        logits[folder] = Batch(backend, 1).extend(ids)[0]
        backend.close()
    assert compare_logits(logits[source], logits[out])["cosine_mean"] > 0.99


def test_a_source_of_a_newer_ir_is_written_at_the_oldest_its_opsets_allow(
    tiny_artifact, tmp_path, one_prompt
):
    """Artifacts exported before exports declared the oldest IR carry onnx 1.23's IR 14, which
    onnxruntime 1.31 refuses to load; quantizing one writes what its opsets need."""
    source = tmp_path / "source"
    shutil.copytree(tiny_artifact, source)
    model = onnx.load(str(source / "model.onnx"), load_external_data=False)
    model.ir_version = 14
    onnx.save_model(model, str(source / "model.onnx"))
    out = tmp_path / "int8"
    quantize_artifact(
        source, out, "int8-weight", samples=2, quality_prompts=one_prompt, progress=False
    )
    written = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert written.ir_version == 11  # opset 23's; com.microsoft adds no requirement
    open_backend(out).close()


@pytest.mark.parametrize(
    ("mode", "block", "kernel", "default"),
    [
        ("int4-weight", 64, "INT4", 32),
        ("int8-weight", 128, "INT8", 64),
        ("int8-dynamic", 128, "INT8", 64),
    ],
)
def test_blocks_over_the_default_refuse_batch_invariance_with_the_fix(
    artifact, tmp_path, one_prompt, mode, block, kernel, default
):
    """onnxruntime's CPU MatMulNBits rounds a row differently beside other rows at blocks over
    the defaults (benchmarks/README.md): such an artifact decodes, its MatMulNBits nodes take the
    block asked for, but it cannot promise invariance."""
    from qwen_deploy.generation.engine import BatchEngine
    from qwen_deploy.generation.generator import Generator

    out = tmp_path / f"{mode}-block{block}"
    source = artifact(CALM, attention="gqa")
    quantize_artifact(
        source, out, mode, samples=2, block_size=block, quality_prompts=one_prompt, progress=False
    )
    bits = {"INT4": 4, "INT8": 8}[kernel]
    nbits = [n for n in _nodes(out) if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert {a["block_size"] for a in attrs if a["bits"] == bits} == {block}
    assert Manifest.load(out).quantization.block_size == block
    assert Manifest.load(source).row_independent_kernels
    assert not Manifest.load(out).row_independent_kernels
    generator = Generator(out)
    assert BatchEngine(generator).own_lengths  # rows keep their lengths; invariance is refused
    expected = (
        f"{mode} artifact was quantized with --block-size {block}, where onnxruntime's {kernel} "
        f"kernel rounds a row differently beside other rows: quantize with the default "
        f"--block-size {default}"
    )
    with pytest.raises(QwenDeployError, match=expected):
        BatchEngine(generator, batch_invariant=True)
