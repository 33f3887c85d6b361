"""Memory estimates before the work: the budget, and commands that load a model refused with
what they need and what would fit instead."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from qwen_deploy import memory
from qwen_deploy.cli import main
from qwen_deploy.manifest import Manifest


def test_a_container_limit_below_the_machines_memory_is_the_budget(tmp_path, monkeypatch):
    (tmp_path / "memory.max").write_text("3000000000\n")
    (tmp_path / "memory.current").write_text("1000000000\n")
    monkeypatch.setattr(memory, "CGROUP", tmp_path)
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: type("M", (), {"available": 8e9}))
    assert memory.available() == (2_000_000_000, "left under this container's memory limit")
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.available() == (8e9, "available on this machine")
    assert memory.budget(1.5) == (1_500_000_000, "allowed by --max-memory")


def test_fin_r1_shaped_needs_are_what_the_arithmetic_says():
    """The numbers the refusals quote for Qwen2.5-7B's shapes (docs/DESIGN.md, Memory)."""
    from benchmarks._synthetic import fin_r1_config
    from qwen_deploy.checkpoint.huggingface import spec_from_config

    spec = spec_from_config(fin_r1_config())
    params = sum(memory.parameters(spec).values())
    assert params == 7_615_616_512  # Qwen2.5-7B's published parameter count
    assert memory.artifact_estimate(spec, "fp16") == 2 * params
    whole = memory.reference(spec, 2, "float32", "whole").total
    by_layer = memory.reference(spec, 2, "float32", "by-layer").total
    assert whole == 4 * params  # 30.5 GB: more than a 24 GB machine has
    assert by_layer == 152064 * 3584 * (4 + 2)  # the LM head widened from bf16: 3.3 GB
    int4 = memory.artifact_estimate(spec, "int4-weight")
    assert 5e9 < int4 < 7e9 < memory.artifact_estimate(spec, "int8-weight") < 9e9


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_model_that_cannot_fit_is_refused_before_it_loads(tiny_artifact, command):
    args = [command, str(tiny_artifact)] + (["hello"] if command == "generate" else [])
    result = CliRunner().invoke(main, [*args, "--max-memory", "0.01"])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in result.output
    assert message.startswith(f"error: running {tiny_artifact} needs about ")
    assert "fp32 artifact" in message and "0.0 GB allowed by --max-memory" in message
    spec = Manifest.load(tiny_artifact).model
    int4 = memory.gb(memory.artifact_estimate(spec, "int4-weight"))
    assert f"quantize --mode int4-weight (weights about {int4})" in message


def test_bench_batches_are_sizes_of_two_or_more(tiny_artifact):
    result = CliRunner().invoke(main, ["bench", str(tiny_artifact), "--batches", "1,4"])
    assert result.exit_code == 2 and "give batch sizes of 2 or more" in result.stderr
