"""The machine a benchmark reports: the CPU's kernel features as /proc/cpuinfo lists them and the
integer GEMM onnxruntime gets."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from qwen_deploy.machine import (
    KERNEL_FEATURES,
    cpu_features,
    describe,
    int8_gemm_tops,
    this_machine,
)

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 avx512vbmi avx_vnni
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 avx512vbmi avx_vnni amx_tile
"""


def test_cpu_features_are_what_the_first_processor_lists_in_kernel_order():
    cpu, features = cpu_features(CPUINFO)
    assert cpu == "AMD EPYC 9R14"
    assert features == ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16"]
    assert cpu_features("") == ("unknown", [])


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo on this system")
def test_this_machine_reads_its_own_cpuinfo_and_measures_the_integer_gemm():
    machine = this_machine(threads=1)
    assert machine.features == cpu_features(Path("/proc/cpuinfo").read_text())[1]
    assert set(machine.features) <= set(KERNEL_FEATURES) and machine.cores >= 1
    # one thread, below any core's peak (AMX: 1,024 int8 multiply-adds a cycle, 7 TOPS at 3.5
    # GHz): a unit off by 1,000 fails here
    assert 0 < machine.int8_gemm_tops < 25
    line = describe(asdict(machine))
    assert line.startswith(f"machine: {machine.cpu}, {machine.cores} cores; ")
    assert line.endswith(f"{machine.int8_gemm_tops:.2f} TOPS")


def test_the_integer_gemm_probe_takes_other_shapes():
    assert int8_gemm_tops((3, 64, 17), threads=1, repeats=2) > 0
