"""TensorRT builder and backend. Options, profiles, manifest and compatibility checks are pure and
run everywhere; the real build and the engine's parity run where TensorRT and a GPU exist."""

from __future__ import annotations

import ctypes.util
import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qwen_deploy.artifact import copy_side_files
from qwen_deploy.backends import open_backend
from qwen_deploy.cli import main
from qwen_deploy.errors import QwenDeployError
from qwen_deploy.manifest import Manifest
from qwen_deploy.parity.presets import PRESETS
from qwen_deploy.records import Engine, EngineDevice, EngineLimits
from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from qwen_deploy.tensorrt.backend import (
    TensorRTBackend,
    check_engine_compat,
    select_profile,
)
from qwen_deploy.tensorrt.builder import (
    PLAN_FILE,
    BuildOptions,
    build_engine,
    engine_manifest,
    engine_record,
    profile_shapes,
    resolve_options,
)
from qwen_deploy.tensorrt.cuda import CudaDriver, DeviceInfo

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_DRIVER = ctypes.util.find_library("cuda") is not None
H100 = DeviceInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 80 << 30)


@pytest.fixture(scope="module")
def manifest(tiny_artifact) -> Manifest:
    return Manifest.load(tiny_artifact)


def resolved(manifest, **kwargs) -> BuildOptions:
    return resolve_options(BuildOptions(**kwargs), manifest)


# -- options ---------------------------------------------------------------------------------
def test_defaults_fill_opt_shapes(manifest):
    o = resolved(manifest, max_batch=4, max_input_len=256, max_seq_len=1024)
    assert (o.opt_batch, o.opt_input_len) == (1, 256)  # min(512, max_input_len)
    assert resolved(manifest).opt_input_len == 512


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_seq_len": 5000}, "exceeds the model's max_position_embeddings \\(4096\\)"),
        ({"max_input_len": 3000, "max_seq_len": 2048}, "--max-input-len 3000 exceeds"),
        ({"max_batch": 0}, "--max-batch must be >= 1"),
        ({"max_batch": 2, "opt_batch": 3}, "--opt-batch 3 must be between 1 and --max-batch 2"),
        ({"max_input_len": 64, "opt_input_len": 65}, "--opt-input-len 65"),
        ({"workspace_gb": 0.0}, "--workspace-gb must be > 0"),
        ({"plugin_libs": (Path("/no/such/libplugin.so"),)}, "does not exist"),
        ({"timing_cache": Path("/no/such/dir/cache.bin")}, "folder of --timing-cache"),
    ],
)
def test_bad_options_are_refused(manifest, kwargs, message):
    with pytest.raises(QwenDeployError, match=message):
        resolved(manifest, **kwargs)


def test_duplicate_plugin_names_are_refused(manifest, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    libs = (tmp_path / "a" / "libp.so", tmp_path / "b" / "libp.so")
    for lib in libs:
        lib.write_bytes(b"")
    with pytest.raises(QwenDeployError, match="distinct file names"):
        resolved(manifest, plugin_libs=libs)


# -- profiles --------------------------------------------------------------------------------
def test_profiles_cover_every_input_with_ordered_ranges(manifest):
    o = resolved(
        manifest, max_batch=8, max_input_len=2048, max_seq_len=4096, opt_batch=2, opt_input_len=300
    )
    profiles = profile_shapes(manifest, o)
    assert [p["name"] for p in profiles] == ["prefill", "decode"]
    spec = manifest.model
    for p in profiles:
        assert set(p["shapes"]) == {t.name for t in manifest.inputs}
        for s in p["shapes"].values():
            assert all(
                lo <= opt <= hi for lo, opt, hi in zip(s["min"], s["opt"], s["max"], strict=True)
            )
        past = p["shapes"]["past_key_values.0.key"]
        assert past["max"] == [8, spec.num_kv_heads, 4095, spec.head_dim]
        assert p["shapes"]["attention_mask"]["max"] == [8, 4096]
    prefill, decode = (p["shapes"] for p in profiles)
    assert prefill["input_ids"] == {"min": [1, 1], "opt": [2, 300], "max": [8, 2048]}
    assert decode["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [8, 1]}
    assert decode["past_key_values.0.key"]["opt"][2] == 300


def test_profile_selection_follows_the_phase(manifest):
    profiles = profile_shapes(
        manifest, resolved(manifest, max_batch=4, max_input_len=128, max_seq_len=256)
    )
    spec = manifest.model

    def shapes(batch, seq, past):
        kv = (batch, spec.num_kv_heads, past, spec.head_dim)
        return {
            "input_ids": (batch, seq),
            "attention_mask": (batch, past + seq),
            "position_ids": (batch, seq),
            **{t.name: kv for t in manifest.inputs if t.name.startswith("past_")},
        }

    assert select_profile(profiles, shapes(2, 100, 0)) == 0
    assert select_profile(profiles, shapes(2, 1, 100)) == 1
    assert select_profile(profiles, shapes(1, 1, 0)) == 1  # one-token prompt: decode kernels
    assert select_profile(profiles, shapes(1, 20, 200)) == 0  # chunked prefill with a past
    with pytest.raises(QwenDeployError, match=r"input_ids \[5, 1\].*--max-batch"):
        select_profile(profiles, shapes(5, 1, 10))
    with pytest.raises(QwenDeployError, match=r"no optimization profile"):
        select_profile(profiles, shapes(1, 129, 0))


# -- manifest --------------------------------------------------------------------------------
def test_engine_manifest_round_trip(manifest, tmp_path):
    o = resolved(manifest, max_batch=2, max_input_len=64, max_seq_len=128, workspace_gb=1.5)
    profiles = profile_shapes(manifest, o)
    record = engine_record(
        "10.15.1.29", H100.to_dict(), o, profiles, ["plugins/libx.so"], manifest, 12.34
    )
    engine_manifest(manifest, record).save(tmp_path)
    loaded = Manifest.read(tmp_path)  # the record alone: no model.plan here
    assert loaded.model_file == PLAN_FILE and loaded.data_files == []
    assert loaded.inputs == manifest.inputs and loaded.outputs == manifest.outputs
    e = loaded.engine
    assert e == record
    assert e.tensorrt_version == "10.15.1.29" and e.device.compute_capability == "9.0"
    assert e.device.extra == {"index": 0, "total_memory_bytes": H100.total_memory}  # kept
    assert [p["index"] for p in e.profiles] == [0, 1]
    assert e.profiles[1]["shapes"] == profiles[1]["shapes"]
    assert e.limits == EngineLimits(max_batch=2, max_input_len=64, max_seq_len=128)
    assert e.workspace_bytes == int(1.5 * 2**30)
    assert e.plugin_libraries == ["plugins/libx.so"] and e.strongly_typed is True
    assert e.source["precision"] == manifest.precision


def test_engine_compatibility_checks():
    engine = Engine(tensorrt_version="10.15.1.29", device=EngineDevice.from_dict(H100.to_dict()))
    assert check_engine_compat(engine, "10.15.1.29", H100) == []
    with pytest.raises(
        QwenDeployError,
        match=r"built with TensorRT 10.15.1.29 .* has TensorRT "
        r"11.0.0.1",
    ):
        check_engine_compat(engine, "11.0.0.1", H100)
    l40 = DeviceInfo(0, "NVIDIA L40S", "8.9", 48 << 30)
    with pytest.raises(QwenDeployError, match=r"compute capability 9.0.*NVIDIA L40S"):
        check_engine_compat(engine, "10.15.1.29", l40)
    h100_pcie = replace(H100, name="NVIDIA H100 PCIe")
    [warning] = check_engine_compat(engine, "10.15.1.29", h100_pcie)
    assert "NVIDIA H100 80GB HBM3" in warning and "H100 PCIe" in warning


# -- environment errors ----------------------------------------------------------------------
@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_build_without_tensorrt_names_the_install(tiny_artifact, tmp_path):
    with pytest.raises(QwenDeployError, match=r"TensorRT is not installed.*pypi\.nvidia\.com"):
        build_engine(
            tiny_artifact, tmp_path / "engine", BuildOptions(max_seq_len=256, max_input_len=128)
        )
    assert not (tmp_path / "engine").exists()


def test_build_checks_options_and_output_before_tensorrt(tiny_artifact, tmp_path):
    with pytest.raises(QwenDeployError, match="max_position_embeddings"):
        build_engine(tiny_artifact, tmp_path / "e", BuildOptions(max_seq_len=10**6))
    (tmp_path / "e").mkdir()
    with pytest.raises(QwenDeployError, match="already exists"):
        build_engine(
            tiny_artifact, tmp_path / "e", BuildOptions(max_seq_len=256, max_input_len=128)
        )


def test_backend_refuses_onnx_artifacts(tiny_artifact):
    with pytest.raises(QwenDeployError, match="not a TensorRT engine artifact"):
        TensorRTBackend(tiny_artifact)


@pytest.fixture
def plan_only(manifest, tiny_artifact, tmp_path) -> Path:
    """An engine artifact's folder as `build` lays it out, with a plan TensorRT never reads."""
    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / PLAN_FILE).write_bytes(b"plan")
    copy_side_files(tiny_artifact, folder, manifest.tokenizer_files)
    engine = Engine(format="tensorrt", plan=PLAN_FILE)
    replace(manifest, model_file=PLAN_FILE, data_files=[], engine=engine).save(folder)
    return folder


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_every_command_runs_engine_artifacts_on_tensorrt(plan_only, tiny_checkpoint):
    """generate, serve (the batching engine), parity and Triton's model open an engine artifact
    with TensorRT, from its manifest: here that ends at TensorRT's missing install."""
    with pytest.raises(QwenDeployError, match="TensorRT is not installed here"):
        open_backend(plan_only)
    runner = CliRunner()
    for args in (
        ["generate", str(plan_only), "hi"],
        ["serve", str(plan_only), "--port", "8123"],
        ["parity", str(plan_only), "--reference", str(tiny_checkpoint), "--quiet"],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert "TensorRT is not installed here" in result.output, args


def test_a_backend_that_cannot_run_the_artifact_is_refused(
    plan_only, tiny_artifact, tiny_checkpoint
):
    with pytest.raises(QwenDeployError, match="qwen-deploy build ARTIFACT -o ENGINE"):
        open_backend(tiny_artifact, backend="tensorrt")
    with pytest.raises(QwenDeployError, match="a TensorRT engine artifact, which the onnxruntime"):
        open_backend(plan_only, backend="onnxruntime")
    with pytest.raises(QwenDeployError, match="unknown backend 'vllm'"):
        open_backend(tiny_artifact, backend="vllm")
    result = CliRunner().invoke(
        main,
        [
            "parity",
            str(tiny_artifact),
            "--reference",
            str(tiny_checkpoint),
            "--backend",
            "tensorrt",
        ],
    )
    assert result.exit_code == 2 and "qwen-deploy build" in result.output


@pytest.mark.skipif(HAS_DRIVER, reason="an NVIDIA driver is installed here")
def test_no_gpu_driver_is_a_clear_error():
    with pytest.raises(QwenDeployError, match="no NVIDIA driver here"):
        CudaDriver()


# -- the real thing --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_artifact(artifact, tmp_path_factory):
    if not HAS_TRT:
        pytest.skip("TensorRT not installed")
    try:
        CudaDriver()
    except QwenDeployError as e:
        pytest.skip(f"no CUDA GPU ({e})")
    out = tmp_path_factory.mktemp("engine") / "e"
    cache = out.parent / "timing.cache"
    build_engine(
        artifact(precision="fp16"),
        out,
        BuildOptions(max_batch=2, max_input_len=32, max_seq_len=64, timing_cache=cache),
        progress=False,
    )
    return out, cache


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_writes_engine_artifact(engine_artifact, artifact):
    out, cache = engine_artifact
    manifest = Manifest.load(out)
    assert (out / PLAN_FILE).stat().st_size > 0 and cache.stat().st_size > 0
    assert manifest.engine.limits.max_seq_len == 64
    assert manifest.engine.device.compute_capability == CudaDriver().info().compute_capability
    assert (out / "tokenizer.json").is_file()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_matches_onnxruntime_fp32(engine_artifact, artifact):
    out, _ = engine_artifact
    trt_backend, reference = TensorRTBackend(out), OnnxRuntimeBackend(artifact())
    ids = np.random.default_rng(0).integers(0, 150000, (2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    rc, tc = reference.new_cache(2), trt_backend.new_cache(2)
    rows = [
        (
            reference.forward(ids, mask, pos, rc)[:, -1],
            trt_backend.forward(ids, mask, pos, tc)[:, -1],
        )
    ]
    for _ in range(8):
        token = rows[-1][0].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        rows.append(
            (
                reference.forward(token, mask, pos, rc)[:, -1],
                trt_backend.forward(token, mask, pos, tc, last_only=True)[:, -1],
            )
        )
    ref = np.concatenate([r for r, _ in rows])
    cand = np.concatenate([c for _, c in rows])
    assert not PRESETS["fp16"].failures(PRESETS["fp16"].measure(ref, cand))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_parity_checks_an_engine_artifact(engine_artifact):
    """`qwen-deploy parity` runs the engine itself against transformers (fp16 preset)."""
    out, _ = engine_artifact
    source = Manifest.load(out).source["path"]
    result = CliRunner().invoke(
        main, ["parity", str(out), "--reference", source, "--steps", "4", "--json", "-", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert '"passed": true' in result.output


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_cache_survives_rows_leaving_and_joining(engine_artifact, artifact):
    """Batch.keep / merge / truncate rebuild the engine's device cache from host arrays: the
    next logits equal those of a cache that never moved."""
    from qwen_deploy.runtime.decode import Batch

    out, _ = engine_artifact
    backend = TensorRTBackend(out)
    prompts = [[11, 12, 13, 14], [21, 22], [31, 32, 33]]
    moved, still = Batch(backend, 3), Batch(backend, 3)
    moved.prefill(prompts, 0)
    expected = still.prefill(prompts, 0)[:, -1]
    token = expected.argmax(-1)
    moved.keep([0, 2])
    tail = Batch(backend, 1)
    tail.prefill([prompts[1]], 0)
    moved.merge(tail)  # rows now 0, 2, 1
    got = moved.step(token[[0, 2, 1]])
    want = still.step(token)[[0, 2, 1]]
    np.testing.assert_allclose(got, want, atol=2e-2)
    length, nxt = moved.length, got.argmax(-1)
    moved.step(nxt)
    moved.truncate(length)  # forget that step: the same step again gives the same logits
    np.testing.assert_allclose(moved.step(nxt), still.step(nxt[[0, 2, 1]])[[0, 2, 1]], atol=2e-2)
