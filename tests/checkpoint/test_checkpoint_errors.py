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
    with pytest.raises(QwenDeployError, match=r"--force replaces only a folder qwen-deploy"):
        export_checkpoint(small, out, progress=False, force=True)  # not ours: kept
    assert (out / "keep.txt").read_text() == "mine"


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


def _cli_export_error(source: Path, out: Path) -> str:
    """stderr of an `export` that must fail as a user error: exit 2, one line, no traceback."""
    result = CliRunner().invoke(main, ["export", str(source), "-o", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    return result.stderr


@pytest.mark.parametrize(
    "changes, field, shown, expected",
    [
        ({"hidden_size": "sixty-four"}, "hidden_size", '"sixty-four"', "a positive integer"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers", "2.5", "a positive integer"),
        ({"num_key_value_heads": 0}, "num_key_value_heads", "0", "a positive integer"),
        ({"vocab_size": True}, "vocab_size", "true", "a positive integer"),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps", '"1e-6"', "a positive number"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": "1e6"}},
            "rope_parameters.rope_theta",
            '"1e6"',
            "a positive number",
        ),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings", '"no"', "true or false"),
    ],
)
def test_config_value_of_the_wrong_type(small, tmp_path, changes, field, shown, expected):
    _edit_config(small, **changes)
    assert _cli_export_error(small, tmp_path / "out") == (
        f"error: {small / 'config.json'} field '{field}' is {shown}; it must be {expected}.\n"
    )


def test_config_not_json(small, tmp_path):
    (small / "config.json").write_text('{"hidden_size": 64,')
    assert _cli_export_error(small, tmp_path / "out") == (
        f"error: {small / 'config.json'} is not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 20 (char 19)); restore the file from the model's source.\n"
    )


def test_config_not_utf8(small, tmp_path):
    (small / "config.json").write_bytes(b'{"model_type": "qwen2\xff"}')
    assert _cli_export_error(small, tmp_path / "out") == (
        f"error: {small / 'config.json'} is not UTF-8 text (byte 0xff at offset 21); "
        "restore the file from the model's source.\n"
    )


def test_config_not_an_object(small, tmp_path):
    (small / "config.json").write_text("[1, 2]")
    assert _cli_export_error(small, tmp_path / "out") == (
        f"error: {small / 'config.json'} holds a JSON list, not an object.\n"
    )
