"""Bad input to `export`: each gets a clear error naming the problem, and leaves no artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen_deploy.cli import main
from qwen_deploy.errors import QwenDeployError
from qwen_deploy.export import export_checkpoint

SMALL = {"vocab": 1024, "tokenizer": False}


@pytest.fixture
def small(checkpoint, tmp_path) -> Path:
    """A private copy of a small checkpoint that a test may damage."""
    return Path(shutil.copytree(checkpoint(**SMALL), tmp_path / "ckpt"))


@pytest.fixture
def sharded(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint(**SMALL, max_shard_size="200KB"), tmp_path / "ckpt"))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _export_fails(source: Path, out: Path, match: str) -> None:
    with pytest.raises(QwenDeployError, match=match):
        export_checkpoint(source, out, progress=False)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "temp folder left behind"


def test_missing_folder(tmp_path):
    _export_fails(tmp_path / "nope", tmp_path / "out", "does not exist")


def test_missing_config(small, tmp_path):
    (small / "config.json").unlink()
    _export_fails(small, tmp_path / "out", "no config.json")


def test_non_qwen2_config(small, tmp_path):
    _edit_config(small, model_type="llama", architectures=["LlamaForCausalLM"])
    _export_fails(small, tmp_path / "out", r"model_type='llama'.*Qwen2ForCausalLM")


def test_sliding_window_refused(small, tmp_path):
    _edit_config(small, use_sliding_window=True)
    _export_fails(small, tmp_path / "out", "use_sliding_window")


def test_unimplemented_rope_scaling_refused(small, tmp_path):
    _edit_config(small, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    _export_fails(small, tmp_path / "out", "rope_parameters.rope_type is 'yarn'")


def test_missing_rope_theta(small, tmp_path):
    _edit_config(small, rope_parameters=None)
    _export_fails(small, tmp_path / "out", "no RoPE theta")


def test_truncated_safetensors(small, tmp_path):
    weights = small / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _export_fails(small, tmp_path / "out", "truncated")


def test_missing_shard(sharded, tmp_path):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _export_fails(sharded, tmp_path / "out", f"missing.*{shard.name}")


def test_shape_mismatch(small, tmp_path):
    _edit_config(small, intermediate_size=96)
    _export_fails(
        small, tmp_path / "out", r"mlp.gate_proj.weight has shape \[128, 64\].*\[96, 64\]"
    )


def test_missing_tensor(small, tmp_path):
    _edit_config(small, num_hidden_layers=3)
    _export_fails(small, tmp_path / "out", "model.layers.2.* is missing")


def test_existing_output_refused_without_force(small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QwenDeployError, match=r"already exists.*--force"):
        export_checkpoint(small, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_checkpoint(small, out, progress=False, force=True)
    assert (out / "manifest.json").is_file() and not (out / "keep.txt").exists()


def test_interrupted_export_leaves_nothing(small, tmp_path):
    out = tmp_path / "out"

    def interrupt(name: str) -> None:
        if name == "model.layers.1":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(small, out, progress=False, on_layer=interrupt)
    assert list(tmp_path.iterdir()) == [small]


def test_interrupted_forced_export_keeps_the_old_artifact(small, tmp_path):
    out = tmp_path / "out"
    export_checkpoint(small, out, progress=False)
    before = (out / "manifest.json").read_text()

    def fail(name: str) -> None:
        if name == "lm_head":
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(small, out, progress=False, force=True, on_layer=fail)
    assert (out / "manifest.json").read_text() == before


def test_cli_reports_error_on_stderr_with_exit_2(small, tmp_path):
    (small / "config.json").unlink()
    result = CliRunner().invoke(main, ["export", str(small), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "error:" in result.stderr and "no config.json" in result.stderr
    assert "Traceback" not in result.output
