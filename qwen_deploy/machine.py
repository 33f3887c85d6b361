"""What the machine a benchmark ran on can do, measured there, so that its numbers can be read
next to another machine's: the CPU and the kernel features its flags list (read from
/proc/cpuinfo, never assumed), the memory bandwidth a matrix-vector product gets, and the
integer matrix product onnxruntime gets. Machines of one CPU family differ most in the last:
onnxruntime's MatMulInteger (int8-dynamic's linears) runs on AMX tiles where the kernel allows
them and on AVX-512 VNNI elsewhere, while MatMulNBits (int4-weight, int8-weight) uses neither.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# the instruction sets the CPU kernels of onnxruntime and its peers choose between
KERNEL_FEATURES = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
# one MLP projection of the 0.5B over a 256-token prefill chunk
GEMM_SHAPE = (256, 896, 4864)


@dataclass
class Machine:
    cpu: str
    cores: int
    features: list[str]  # KERNEL_FEATURES the CPU's flags list
    int8_gemm_tops: float  # onnxruntime's MatMulInteger: tera-operations a second (2 per MAC)


def cpu_features(cpuinfo: str) -> tuple[str, list[str]]:
    """The CPU's model name and the KERNEL_FEATURES its first processor's flags list."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", "unknown"), [f for f in KERNEL_FEATURES if f in flags]


def measured_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Bandwidth now: a float32 matrix-vector product over 1 GiB, larger than CPU caches."""
    matrix = np.ones(size_mb << 18, np.float32).reshape(-1, 1024)  # size_mb MiB of float32
    vector = np.ones((1024,), np.float32)
    matrix @ vector
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matrix @ vector
        times.append(time.perf_counter() - start)
    return matrix.nbytes / statistics.median(times) / 1e9


def int8_gemm_tops(
    shape: tuple[int, int, int] = GEMM_SHAPE, threads: int | None = None, repeats: int = 7
) -> float:
    """onnxruntime's MatMulInteger (uint8 activations, int8 weights) on `shape` (rows, inner,
    columns), median of `repeats`; its product is checked against numpy's exact one first."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows, inner, columns = shape
    generator = np.random.default_rng(0)
    weights = generator.integers(-128, 128, (inner, columns), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "int8_gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [rows, inner])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, columns])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    activations = generator.integers(0, 256, (rows, inner), dtype=np.uint8)
    product = session.run(None, {"a": activations})[0]
    if not np.array_equal(product, activations.astype(np.int64) @ weights.astype(np.int64)):
        raise RuntimeError("onnxruntime's MatMulInteger gave a wrong product on this machine")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"a": activations})
        times.append(time.perf_counter() - start)
    return 2 * rows * inner * columns / statistics.median(times) / 1e12


def this_machine(threads: int | None = None) -> Machine:
    """This machine as a benchmark with `threads` onnxruntime threads sees it."""
    cpuinfo = Path("/proc/cpuinfo")
    cpu, features = cpu_features(cpuinfo.read_text() if cpuinfo.exists() else "")
    return Machine(cpu, os.cpu_count() or 0, features, int8_gemm_tops(threads=threads))


def describe(machine: dict) -> str:
    """One line for a report: the CPU, its kernel features and its integer GEMM."""
    features = ", ".join(machine["features"]) or "none of " + ", ".join(KERNEL_FEATURES)
    return (
        f"machine: {machine['cpu']}, {machine['cores']} cores; {features}; onnxruntime int8 "
        f"GEMM (MatMulInteger, {' x '.join(map(str, GEMM_SHAPE))}) "
        f"{machine['int8_gemm_tops']:.2f} TOPS"
    )
