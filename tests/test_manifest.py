"""manifest.json round trip: the typed records (records.py) read every section and write it back
unchanged, whichever qwen-deploy wrote it and whatever it lacks (quantized artifacts:
tests/quantize/test_quantize.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from qwen_deploy.manifest import MANIFEST, Manifest
from qwen_deploy.records import Engine, EngineLimits, Generation, KVCache, Quality, Quantization
from qwen_deploy.tensorrt.builder import (
    BuildOptions,
    engine_manifest,
    engine_record,
    profile_shapes,
    resolve_options,
)
from qwen_deploy.tensorrt.cuda import DeviceInfo

REAL = sorted(Path("/tmp/real").glob("*/manifest.json"))  # read only: never written here


def assert_round_trip(path: Path) -> Manifest:
    """Loading `path` and writing it back gives its very bytes (what save writes)."""
    text = path.read_text()
    manifest = Manifest.from_dict(json.loads(text))
    assert manifest.to_dict() == json.loads(text)
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text
    return manifest


def test_engine_manifest_round_trips(tiny_artifact, tmp_path):
    source = Manifest.load(tiny_artifact)
    options = resolve_options(BuildOptions(max_seq_len=128, max_input_len=64), source)
    device = DeviceInfo(0, "NVIDIA H200", "9.0", 141 << 30).to_dict()
    record = engine_record(
        "10.15.1.29", device, options, profile_shapes(source, options), [], source, 3.0
    )
    engine_manifest(source, replace(record, plan_sha256="ab" * 32)).save(tmp_path)
    manifest = assert_round_trip(tmp_path / MANIFEST)
    engine = manifest.engine
    assert engine.plan == "model.plan" and engine.limits.max_seq_len == 128
    assert engine.device.name == "NVIDIA H200" and engine.device.extra["index"] == 0
    assert engine.plan_sha256 == "ab" * 32 and engine.source["quantization"] is None
    assert list(engine.to_dict())[-2:] == ["build_seconds", "plan_sha256"]


@pytest.mark.skipif(not REAL, reason="no real artifacts under /tmp/real")
@pytest.mark.parametrize("path", REAL, ids=[p.parent.name for p in REAL])
def test_real_manifests_round_trip(path):
    manifest = assert_round_trip(path)
    if manifest.quantization is not None:
        assert manifest.quality.preset == manifest.quantization.mode


def test_unknown_keys_and_their_order_are_kept(tiny_artifact):
    """A newer or hand-edited manifest: keys this version does not type stay where they were,
    nested ones too, and the typed ones read as attributes."""
    data = json.loads((tiny_artifact / MANIFEST).read_text())
    data["generation"] = {"future_knob": 3, "top_k": 5, "do_sample": True}
    data["quantization"] = {"bits": 8, "mode": "int8-weight", "new_detail": {"a": [1, 2]}}
    data["quality"] = {"passed": False, "new_metric": 0.5, "failures": ["top1 0.5 < 0.95"]}
    data["engine"] = {
        "format": "tensorrt",
        "limits": {"max_batch": 4, "future_limit": 9},
        "device": {"compute_capability": "9.0"},
        "new_section": {"x": None},
    }
    manifest = Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert json.dumps(manifest.to_dict()) == json.dumps(data)  # the order too
    assert manifest.generation.top_k == 5 and manifest.generation.extra == {"future_knob": 3}
    assert manifest.quantization.bits == 8 and manifest.quantization.format is None
    assert manifest.quality.failed and manifest.quality.top1 is None
    assert manifest.engine.limits.max_batch == 4 and manifest.engine.limits.max_seq_len is None
    assert manifest.engine.device.name is None and manifest.engine.profiles == []


def test_an_older_manifest_reads_with_defaults_and_writes_back_what_it_had(tiny_artifact):
    data = json.loads((tiny_artifact / MANIFEST).read_text())
    for key in ("kv_cache", "quantization", "quality", "engine"):
        del data[key]
    data["generation"] = {}
    manifest = Manifest.from_dict(data)
    assert manifest.quantization is None and manifest.quality is None and manifest.engine is None
    assert manifest.kv_cache.layout is None and manifest.generation.do_sample is None
    written = manifest.to_dict()
    assert written["kv_cache"] == {} and written["generation"] == {}
    assert written["quantization"] is written["quality"] is written["engine"] is None


def test_fields_set_after_reading_are_written():
    generation = Generation.from_dict({"top_k": 5})
    assert replace(generation, temperature=0.3).to_dict() == {"top_k": 5, "temperature": 0.3}
    assert replace(generation, top_k=None).to_dict() == {"top_k": None}  # read: kept, now null
    engine = Engine.from_dict({"format": "tensorrt"})
    changed = replace(engine, limits=EngineLimits(max_batch=2, max_input_len=8, max_seq_len=16))
    assert changed.to_dict() == {
        "format": "tensorrt",
        "limits": {"max_batch": 2, "max_input_len": 8, "max_seq_len": 16},
    }


def test_a_record_built_in_code_writes_every_field_in_order():
    assert list(KVCache().to_dict()) == [
        "layout",
        "shape",
        "dtype",
        "past",
        "present",
        "update",
        "rows",
    ]
    quality = Quality(preset="int8-weight", passed=True)
    assert list(quality.to_dict())[-4:] == ["gate", "passed", "failures", "layers"]
    assert quality.to_dict()["failures"] == [] and not quality.failed
    assert Quantization("int8-weight", extra={"x": 1}).to_dict()["x"] == 1
    with pytest.raises(TypeError):
        Quantization.from_dict({"bits": 8})  # a scheme without its mode is malformed
