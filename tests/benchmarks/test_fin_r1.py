"""benchmarks/fin_r1.py end to end on a tiny checkpoint: every command runs as a user runs it and
its own peak RSS and verdict are reported (the 7B run's numbers: benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fin_r1.py"


@pytest.mark.exhaustive  # ~1.5 min: an export, a quantize, a parity, a server and two benches
def test_every_stage_runs_and_reports_its_own_peak(checkpoint, tmp_path):
    folder = checkpoint(init_std=0.05)
    args = ["--checkpoint", str(folder), "--workdir", str(tmp_path), "--modes", "int8-weight"]
    args += ["--samples", "2", "--parity-steps", "2", "--no-fp16-parity", "--json"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = {s["name"]: s for s in json.loads(done.stdout)["stages"]}
    assert list(stages) == [
        "export fp16",
        "quantize int8-weight",
        "parity int8-weight",
        "generate 32 tokens",
        "serve + 1 chat",
        "bench 128",
        "bench 2048",
    ]
    for stage in stages.values():
        assert stage["exit_code"] == 0 and 0.05 < stage["peak_rss_gb"] < 4 and stage["wall_s"] > 0
    assert stages["quantize int8-weight"]["report"]["passed"]
    parity = stages["parity int8-weight"]["report"]
    assert parity["passed"] and parity["reference_load"] == "whole"
    assert stages["generate 32 tokens"]["report"]["completion_tokens"] == 32
    assert stages["serve + 1 chat"]["report"]["status"] == 200
    bench = stages["bench 2048"]["report"]
    assert bench["config"]["prompt_len"] == 2048 and bench["config"]["batches"] == []
