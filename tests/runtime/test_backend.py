"""The onnxruntime backend's KV caches: host arrays and bound (IO-binding, in place for gqa)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qwen_deploy.contract import DATA_FILE
from qwen_deploy.errors import QwenDeployError
from qwen_deploy.manifest import Manifest
from qwen_deploy.runtime.decode import Batch
from qwen_deploy.runtime.onnxruntime_backend import GROW_STEP, OnnxRuntimeBackend


@pytest.fixture(scope="module", params=["onnx", "gqa"])
def backend(request, artifact) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(artifact(attention=request.param))


def left_padded(total: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two rows of `total` columns; the second starts with `pad` padding positions."""
    ids = np.random.default_rng(0).integers(0, 150000, (2, total))
    mask = np.ones((2, total), np.int64)
    mask[1, :pad] = 0
    return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@pytest.mark.parametrize("capacity", [None, 12], ids=["host", "bound"])
def test_prefill_then_decode_equals_one_full_pass(backend, capacity):
    total, prompt = 12, 7
    ids, mask, positions = left_padded(total, pad=3)
    full = backend.forward(ids, mask, positions, backend.new_cache(2))
    cache = backend.new_cache(2, capacity=capacity)
    steps = [backend.forward(ids[:, :prompt], mask[:, :prompt], positions[:, :prompt], cache)]
    for t in range(prompt, total):
        steps.append(
            backend.forward(ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1], cache)
        )
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[1:, 3:], full[1:, 3:], atol=1e-4)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[0], full[0], atol=1e-4)
    assert cache.length == total
    if capacity is None:
        spec = backend.manifest.model
        assert {a.shape for a in cache.arrays.values()} == {
            (2, spec.num_kv_heads, total, spec.head_dim)
        }
    else:
        assert cache.arrays == {} and cache.values


def test_bound_in_place_cache_grows_beyond_its_capacity(artifact):
    backend = OnnxRuntimeBackend(artifact(attention="gqa"))
    assert backend.in_place
    total = GROW_STEP + 4
    ids, mask, positions = left_padded(total, pad=0)
    ids, mask, positions = ids[:1], mask[:1], positions[:1]
    host = backend.new_cache(1)
    bound = backend.new_cache(1, capacity=8)
    assert bound.capacity == GROW_STEP
    start = GROW_STEP - 3
    for cache in (host, bound):
        backend.forward(ids[:, :start], mask[:, :start], positions[:, :start], cache)
    for t in range(start, total):
        step = (ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1])
        np.testing.assert_allclose(
            backend.forward(*step, bound), backend.forward(*step, host), atol=1e-4
        )
    assert bound.capacity == 2 * GROW_STEP and bound.length == host.length == total


def test_unknown_or_missing_provider_is_a_clear_error(tiny_artifact):
    with pytest.raises(QwenDeployError, match="provider 'tpu' is not one of cpu, cuda"):
        OnnxRuntimeBackend(tiny_artifact, provider="tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the missing-provider message cannot be shown")
    with pytest.raises(QwenDeployError, match="install onnxruntime-gpu"):
        OnnxRuntimeBackend(tiny_artifact, provider="cuda")


@pytest.mark.parametrize("attention", ["onnx", "gqa", "decomposed"])
def test_graph_logits_to_keep_slices_the_last_positions_and_defaults_to_all(artifact, attention):
    """The contract as any onnxruntime consumer sees it: an input it may feed or leave out."""
    folder = artifact(attention=attention)
    session = ort.InferenceSession(str(folder / "model.onnx"))
    assert [i.name for i in session.get_overridable_initializers()] == ["logits_to_keep"]
    ids, mask, positions = left_padded(6, pad=2)
    spec = OnnxRuntimeBackend(folder).manifest.model
    empty = np.zeros((2, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for i in range(spec.num_layers):
        feeds |= {f"past_key_values.{i}.key": empty, f"past_key_values.{i}.value": empty}
    default = session.run(["logits"], feeds)[0]
    assert default.shape == (2, 6, spec.vocab_size)
    for keep, rows in ((0, 6), (1, 1), (4, 4), (9, 6)):
        kept = session.run(["logits"], {**feeds, "logits_to_keep": np.array(keep, np.int64)})[0]
        assert kept.shape == (2, rows, spec.vocab_size)
        np.testing.assert_array_equal(kept, default[:, 6 - rows :])


@pytest.mark.parametrize("capacity", [None, 12], ids=["host", "bound"])
def test_last_only_returns_the_last_position_of_a_full_step(backend, capacity):
    ids, mask, positions = left_padded(7, pad=3)
    full_cache, last_cache = backend.new_cache(2, capacity), backend.new_cache(2, capacity)
    full = backend.forward(ids, mask, positions, full_cache)
    last = backend.forward(ids, mask, positions, last_cache, last_only=True)
    assert last.shape == (2, 1, full.shape[2])
    np.testing.assert_array_equal(last, full[:, -1:])
    step = (ids[:, :1], np.ones((2, 8), np.int64) * mask[:, -1:], positions[:, -1:] + 1)
    np.testing.assert_array_equal(
        backend.forward(*step, last_cache, last_only=True), backend.forward(*step, full_cache)
    )


def test_artifact_without_logits_to_keep_still_loads_and_slices(artifact, tmp_path):
    """Artifacts exported before the input existed: same logits, last_only sliced on the host."""
    folder = artifact(attention="gqa")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    graph = model.graph
    slice_node = next(n for n in graph.node if n.op_type == "Slice" and n.name.startswith("keep"))
    for node in graph.node:  # bypass the Slice: the final norm reads the hidden states directly
        node.input[:] = [
            slice_node.input[0] if i == slice_node.output[0] else i for i in node.input
        ]
    keep = [n for n in graph.node if n.name.startswith("keep/")]
    for node in keep:
        graph.node.remove(node)
    graph.initializer.remove(next(t for t in graph.initializer if t.name == "logits_to_keep"))
    graph.input.remove(next(i for i in graph.input if i.name == "logits_to_keep"))
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    onnx.save_model(model, str(old / "model.onnx"))
    Manifest.read(old).save(old)
    old_backend, new_backend = OnnxRuntimeBackend(old), OnnxRuntimeBackend(folder)
    ids, mask, positions = left_padded(5, pad=1)
    for capacity in (None, 8):
        old_last = old_backend.forward(
            ids, mask, positions, old_backend.new_cache(2, capacity), last_only=True
        )
        new_last = new_backend.forward(
            ids, mask, positions, new_backend.new_cache(2, capacity), last_only=True
        )
        assert old_last.shape == new_last.shape == (2, 1, new_last.shape[2])
        np.testing.assert_allclose(old_last, new_last, atol=1e-6)


LOAD_FP16 = """
import sys
from pathlib import Path
from qwen_deploy.runtime.decode import Batch
from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
batch = Batch(OnnxRuntimeBackend(sys.argv[1], threads=1), 1)
logits = batch.prefill([list(range(1, 65))], 0)
for _ in range(4):
    logits = batch.step(logits.reshape(1, -1).argmax(-1))
# VmHWM, not ru_maxrss: that one is inherited from the (large) pytest process through fork
status = Path("/proc/self/status").read_text().splitlines()
print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024)
"""


def load_fp16(folder, tmp_path) -> int:
    """Load `folder` on CPU in a fresh process with its own temp folder, prefill 64 tokens and
    decode 4; the process's peak RSS in bytes. Fails if anything was written to the temp folder
    (importing onnxruntime leaves a 51-byte `.ses` file there; a model copy would be MBs)."""
    import os
    import subprocess
    import sys

    temp = tmp_path / "temp"
    temp.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", LOAD_FP16, str(folder)],
        env={**os.environ, "TMPDIR": str(temp)},
        check=True,
        capture_output=True,
        text=True,
    )
    assert sum(f.stat().st_size for f in temp.rglob("*")) < 4096, list(temp.rglob("*"))
    return int(done.stdout.split()[-1])


def test_fp16_on_cpu_loads_without_a_temp_copy(artifact, tmp_path):
    """fp16 artifacts compute in float32 on CPU (onnxruntime's own fp16 path fails the fp16
    preset on the real model: max abs 0.17, KL 1.3e-3) from their fp16 weights, each widened
    where it is used; no float32 copy of the model is written to the temp folder."""
    load_fp16(artifact({"hidden": 256, "intermediate": 512}, precision="fp16"), tmp_path)


@pytest.mark.real
def test_real_fp16_on_cpu_peaks_below_1_3x_the_artifact(real_artifact, tmp_path):
    """The weights stay fp16 in memory (a float32 copy alone would be 2x the artifact; the
    widened copy this replaced peaked at 4.4-5.7x)."""
    folder = real_artifact(precision="fp16")
    size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    peak = load_fp16(folder, tmp_path)
    assert peak < 1.3 * size, f"peak RSS {peak / 1e9:.2f} GB for a {size / 1e9:.2f} GB artifact"


@pytest.mark.parametrize(
    "form", [{"attention": "gqa"}, {"precision": "fp16"}], ids=["mixed-steps", "fp16"]
)
def test_an_artifact_whose_files_are_links_to_another_folder_loads(artifact, tmp_path, form):
    """Model caches link files to blobs kept, and named by their hash, elsewhere. The graphs
    built in memory at load (the mixed-step branch, fp16's float32 compute) read the weights
    from the blob's folder: onnxruntime refuses external data outside the folder it is given,
    following links."""
    source = artifact(**form)
    linked, blobs = tmp_path / "linked", tmp_path / "blobs"
    linked.mkdir()
    blobs.mkdir()
    for file in source.iterdir():
        target = file
        if file.name == DATA_FILE:  # a blob named by its hash
            target = blobs / "3f9a0c"
            os.link(file, target)
        (linked / file.name).symlink_to(target)
    logits = []
    for folder in (source, linked):
        batch = Batch(OnnxRuntimeBackend(folder), 1)
        logits.append(batch.prefill([[5, 6, 7, 8]], 0, last_only=False))
    np.testing.assert_array_equal(logits[0], logits[1])
