"""The export / inspect / parity commands as a user runs them."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qwen_deploy.cli import main


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("What is a bond?\n\n什么是股票？\n")
    return path


def _parity(artifact, checkpoint, *extra):
    return CliRunner().invoke(
        main, ["parity", str(artifact), "--reference", str(checkpoint), "--quiet", *extra]
    )


def test_export_then_inspect(tiny_checkpoint, tmp_path):
    out = tmp_path / "artifact"
    result = CliRunner().invoke(
        main,
        [
            "export",
            str(tiny_checkpoint),
            "-o",
            str(out),
            "--attention",
            "gqa",
            "--precision",
            "fp16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "export: 100%" in result.stderr  # progress while weights stream
    table = CliRunner().invoke(main, ["inspect", str(out)])
    assert table.exit_code == 0
    assert "attention                    gqa" in table.output
    assert "precision                    fp16" in table.output
    assert "[151645, 151643] / 151643" in table.output
    data = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    assert data["model"]["num_kv_heads"] == 2 and data["model"]["rope_theta"] == 1e6
    assert data["generation"]["top_k"] == 20 and data["generation"]["temperature"] == 0.7
    assert data["chat_template"].startswith("{%- if tools %}")
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_inspect_missing_artifact(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert "has no manifest.json" in result.stderr


def test_parity_passes_with_table_json_and_markdown(
    tiny_artifact, tiny_checkpoint, prompts_file, tmp_path
):
    md = tmp_path / "report.md"
    result = _parity(
        tiny_artifact,
        tiny_checkpoint,
        "--prompts",
        str(prompts_file),
        "--steps",
        "3",
        "--json",
        "-",
        "--markdown",
        str(md),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["preset"] == "fp32"
    cases = {s["case"] for s in report["steps"]}
    assert cases == {"prompt 1", "prompt 2", "batch of 2 (left-padded)"}
    assert len(report["steps"]) == 3 * 4
    summary = report["summary"]
    assert summary["max_abs"] <= 1e-4 and summary["tol_ratio"] <= 1 and summary["top1"] == 1.0
    assert "**PASS (fp32 preset)**" in md.read_text()


def test_parity_failure_names_worst_prompt_and_step(tiny_artifact, tiny_checkpoint, prompts_file):
    result = _parity(
        tiny_artifact,
        tiny_checkpoint,
        "--prompts",
        str(prompts_file),
        "--steps",
        "2",
        "--atol",
        "1e-12",
        "--rtol",
        "0",
    )
    assert result.exit_code == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL (fp32 preset): logits beyond atol 1e-12 + rtol 0*|ref|")
    assert "x the bound; max_abs " in last and "; worst: " in last
    assert ("prompt " in last or "batch of 2" in last) and ("prefill" in last or "step" in last)


def test_parity_default_prompt_set(tiny_artifact, tiny_checkpoint):
    result = _parity(tiny_artifact, tiny_checkpoint, "--steps", "1", "--no-batch")
    assert result.exit_code == 0, result.output
    assert "prompt 6" in result.stdout and "batch" not in result.stdout


def test_parity_bad_prompt_file(tiny_artifact, tiny_checkpoint, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    result = _parity(tiny_artifact, tiny_checkpoint, "--prompts", str(bad))
    assert result.exit_code == 2
    assert "line 2 is not valid JSON" in result.stderr


def test_parity_float64_reference_shows_both_distances(
    tiny_artifact, tiny_checkpoint, prompts_file
):
    result = _parity(
        tiny_artifact,
        tiny_checkpoint,
        "--prompts",
        str(prompts_file),
        "--steps",
        "2",
        "--reference-dtype",
        "float64",
        "--json",
        "-",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reference_dtype"] == "float64" and report["passed"]
    ours, torch_fp32 = report["summary"], report["torch_fp32_summary"]
    # both float32 computations sit near exact arithmetic, and neither is exact
    for side in (ours, torch_fp32):
        assert 0 < side["max_abs"] < 1e-4 and side["top1"] == 1.0
    assert all("torch_fp32" in step for step in report["steps"])


def test_float64_reference_computes_in_float64(tiny_checkpoint):
    import numpy as np

    from qwen_deploy.parity.reference import TorchReference

    ids = np.array([[9707, 11, 1879, 0]], dtype=np.int64)
    mask, pos = np.ones_like(ids), np.arange(4, dtype=np.int64)[None]
    exact = TorchReference(tiny_checkpoint, "float64")
    norm = exact.model.model.norm
    hidden = exact._torch.randn(1, 2, norm.weight.shape[0], dtype=exact._torch.float64) * 1e3
    assert norm(hidden).dtype == exact._torch.float64
    # float32 rounding inside RMSNorm would leave ~1e-7 relative error; float64 leaves ~1e-16
    expected = hidden / hidden.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).sqrt()
    assert (norm(hidden) - norm.weight * expected).abs().max() < 1e-10
    logits64 = exact.forward(ids, mask, pos)
    logits32 = TorchReference(tiny_checkpoint).forward(ids, mask, pos)
    assert logits64.dtype == np.float64 and logits32.dtype == np.float32
    assert 0 < np.abs(logits64 - logits32).max() < 1e-4


def _parity_error(artifact, reference) -> str:
    """stderr of a `parity` refused as a user error: exit 2, one line, no traceback."""
    result = _parity(artifact, reference)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr


def test_parity_missing_reference_is_not_taken_for_a_hub_id(tiny_artifact, tmp_path):
    missing = tmp_path / "Qwen" / "nope"
    assert _parity_error(tiny_artifact, missing) == (
        f"error: checkpoint folder {missing} does not exist; pass the folder that holds "
        "config.json and the safetensors files.\n"
    )


def test_parity_reference_with_broken_config(tiny_artifact, tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    assert _parity_error(tiny_artifact, tmp_path) == (
        f"error: {tmp_path / 'config.json'} is not valid JSON (Expecting property name enclosed "
        "in double quotes: line 1 column 2 (char 1)); restore the file from the model's source.\n"
    )


def test_parity_refuses_another_model_before_running_it(tiny_artifact, tiny_checkpoint, checkpoint):
    other = checkpoint(vocab=1024, hidden=32, tokenizer=False)
    assert _parity_error(tiny_artifact, other) == (
        f"error: reference {other} has hidden_size 32, the artifact 64; head_dim 8, the artifact "
        "16; vocab_size 1024, the artifact 151936: parity compares the same model; pass the "
        f"checkpoint the artifact was exported from ({tiny_checkpoint.resolve()}).\n"
    )


def test_parity_reports_where_the_largest_kl_is(
    tiny_artifact, tiny_checkpoint, prompts_file, tmp_path
):
    """The extreme row is reported (case, step, row, input token), not judged."""
    out = tmp_path / "report.json"
    result = _parity(
        tiny_artifact, tiny_checkpoint, "--prompts", str(prompts_file), "--json", str(out)
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    where = report["largest_kl_row"]
    step = max(report["steps"], key=lambda s: s["kl_max"])
    assert (where["case"], where["step"], where["kl"]) == (
        step["case"],
        step["step"],
        step["kl_max"],
    )
    assert 0 <= where["row"] < step["rows"] and isinstance(where["input_token"], int)
    assert report["summary"]["kl_mean"] <= where["kl"]
    assert f"(input token {where['input_token']})" in result.stdout
