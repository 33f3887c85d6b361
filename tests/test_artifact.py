"""Nothing lost: --force replaces only what qwen-deploy wrote, inputs are never outputs, a stopped
run leaves no partial folder for good, and a damaged artifact is one line from every command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen_deploy.artifact import MARKER, check_output, staged_output
from qwen_deploy.cli import main
from qwen_deploy.errors import QwenDeployError
from qwen_deploy.manifest import Manifest


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A user's checkpoint of their own (no qwen-deploy marker), with a note beside it."""
    project = tmp_path / "p"
    shutil.copytree(tiny_checkpoint, project / "ckpt")
    (project / "notes.txt").write_text("my notes")
    return project / "ckpt"


def test_export_onto_its_own_checkpoint_refuses_and_keeps_every_file(ckpt):
    before = snapshot(ckpt.parent)
    code, out = cli("export", ckpt, "-o", ckpt, "--force", "--quiet")
    assert code == 2
    assert f"error: the output {ckpt} is the input {ckpt}; choose an output folder outside" in out
    assert snapshot(ckpt.parent) == before


def test_export_onto_the_folder_holding_its_checkpoint_refuses(ckpt):
    project = ckpt.parent
    before = snapshot(project)
    code, out = cli("export", ckpt, "-o", project, "--force", "--quiet")
    assert code == 2
    assert f"the output {project} contains the input {ckpt}" in out
    assert snapshot(project) == before


def test_force_refuses_a_folder_qwen_deploy_did_not_write(tiny_checkpoint, ckpt, tmp_path):
    other = ckpt.parent  # a user's folder: notes and a checkpoint, no marker
    code, out = cli("export", tiny_checkpoint, "-o", other, "--force", "--quiet")
    assert code == 2
    assert (
        f"--force replaces only a folder qwen-deploy wrote (an artifact, a checkpoint or a "
        f"Triton repository) or an empty one, and {other} is not one; remove it yourself" in out
    )
    assert (other / "notes.txt").read_text() == "my notes"
    a_file = tmp_path / "file.onnx"
    a_file.write_text("x")
    code, out = cli("export", tiny_checkpoint, "-o", a_file, "--force", "--quiet")
    assert code == 2 and f"and {a_file} is a file; remove it yourself" in out
    assert a_file.read_text() == "x"


def test_force_replaces_our_artifact_and_an_empty_folder_but_not_a_file_put_inside(
    tiny_checkpoint, tmp_path
):
    out = tmp_path / "art"
    out.mkdir()  # empty: fine to replace
    assert cli("export", tiny_checkpoint, "-o", out, "--force", "--quiet")[0] == 0
    first = Manifest.load(out).producer["created"]
    assert cli("export", tiny_checkpoint, "-o", out, "--force", "--quiet")[0] == 0
    assert Manifest.load(out).files  # replaced by a complete artifact
    assert Manifest.load(out).producer["created"] >= first
    (out / "my-eval.jsonl").write_text("{}")
    code, msg = cli("export", tiny_checkpoint, "-o", out, "--force", "--quiet")
    assert code == 2
    assert f"--force would delete {out / 'my-eval.jsonl'}, which qwen-deploy did not write" in msg
    assert (out / "my-eval.jsonl").exists() and Manifest.load(out).files


def test_artifacts_written_before_the_marker_are_still_ours(tiny_artifact, tmp_path):
    """An artifact from an older qwen-deploy has no marker: its manifest names its files."""
    old = tmp_path / "old"
    shutil.copytree(tiny_artifact, old)
    (old / MARKER).unlink()
    check_output(old, force=True)
    (old / "stray.txt").write_text("")
    with pytest.raises(QwenDeployError, match=r"would delete .*stray\.txt"):
        check_output(old, force=True)


def test_every_writer_refuses_its_own_input(tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    before = snapshot(art)
    for args in (
        ["quantize", art, "-o", art, "--force", "--mode", "int8-weight"],
        ["triton", art, "-o", art, "--force"],
        ["triton", art, "-o", tmp_path, "--force"],
    ):
        code, out = cli(*args)
        assert code == 2 and "choose an output folder outside the input" in out, (args, out)
    assert snapshot(art) == before
    gguf = tmp_path / "g" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    with pytest.raises(QwenDeployError, match="contains the input"):
        check_output(gguf.parent, force=True, sources=[gguf])


STOPPABLE_EXPORT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from qwen_deploy.export import export_checkpoint

    def wait(name):
        Path(sys.argv[3]).touch()
        time.sleep(60)

    export_checkpoint(sys.argv[1], sys.argv[2], progress=False, on_layer=wait)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_mid_export_removes_the_partial_folder(tiny_checkpoint, tmp_path, signum):
    out, started = tmp_path / "art", tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE_EXPORT, tiny_checkpoint, out, started],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".art.partial-*")), "the export is under way"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}: partial output removed" in err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".art.partial-*"))


def test_a_later_run_removes_partials_of_dead_runs_only(tiny_checkpoint, tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    host = socket.gethostname()

    def partial(name: str, record: dict | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.onnx.data").write_bytes(b"\0" * 1000)
        if record is not None:
            (folder / MARKER).write_text(json.dumps({"written_by": "qwen-deploy", **record}))
        return folder

    stale = partial(
        ".art.partial-dead", {"partial_of": "art", "pid": int(dead.stdout), "host": host}
    )
    alive = partial(".art.partial-live", {"partial_of": "art", "pid": os.getpid(), "host": host})
    unmarked = partial(".art.partial-user", None)
    other = partial(
        ".other.partial-dead", {"partial_of": "other", "pid": int(dead.stdout), "host": host}
    )
    assert cli("export", tiny_checkpoint, "-o", tmp_path / "art", "--quiet")[0] == 0
    assert not stale.exists()
    assert alive.exists() and unmarked.exists() and other.exists()


def test_a_failed_body_leaves_the_old_output_and_no_partial(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), staged_output(out, force=True) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"
    assert json.loads((out / MARKER).read_text())["files"] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- damaged artifacts: one line, exit 2, from every command -----------------------------------


def damage(art: Path, how: str) -> str:
    """Damage a copy of an artifact; returns the file it names."""
    data, model = art / "model.onnx.data", art / "model.onnx"
    if how == "data truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "data emptied":
        data.write_bytes(b"")
    elif how == "data missing":
        data.unlink()
    elif how == "model missing":
        model.unlink()
    elif how == "model truncated":
        model.write_bytes(model.read_bytes()[:1000])
    return "model.onnx" if how.startswith("model") else "model.onnx.data"


DAMAGE = ["data truncated", "data emptied", "data missing", "model missing", "model truncated"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_artifact_is_one_line_from_every_command(
    tiny_artifact, tiny_checkpoint, tmp_path, how
):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    name = damage(art, how)
    missing = how.endswith("missing")
    expected = (
        f"error: artifact {art} is incomplete: {name} is missing; re-export it with "
        "`qwen-deploy export`."
        if missing
        else f"error: artifact {art} is damaged: {name} is "
    )
    for args in (
        ["generate", art, "Hi", "--max-tokens", "2"],
        ["chat", art],
        ["quantize", art, "-o", tmp_path / "q", "--mode", "int8-weight", "--samples", "2"],
        ["triton", art, "-o", tmp_path / "repo"],
        ["inspect", art],
        ["inspect", art, "--verify"],
        ["parity", art, "--reference", tiny_checkpoint, "--steps", "1"],
    ):
        code, out = cli(*args)
        assert code == 2, (args, out)
        lines = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(expected), (args, out)
        if not missing:
            assert "(truncated or replaced)" in lines[0]
    assert not (tmp_path / "q").exists() and not (tmp_path / "repo").exists()


def test_serve_refuses_a_damaged_artifact_before_listening(tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    damage(art, "data truncated")
    run = subprocess.run(
        [Path(sys.executable).parent / "qwen-deploy", "serve", art, "--port", "8765"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: artifact {art} is damaged: model.onnx.data is ")
    )
    assert "Traceback" not in run.stderr


def test_flipped_bits_are_found_by_verify_and_refused_by_triton(tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    assert cli("inspect", art, "--verify", "--quiet")[0] == 0
    data = art / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    data.write_bytes(bytes(raw))
    message = (
        f"error: artifact {art} is damaged: model.onnx.data does not match the hash its "
        "manifest records (its bytes changed on disk); re-export it with `qwen-deploy export`."
    )
    for args in (["inspect", art, "--verify"], ["triton", art, "-o", tmp_path / "repo"]):
        code, out = cli(*args)
        assert code == 2 and message in out, (args, out)
    assert not (tmp_path / "repo").exists()


def test_flipped_bits_in_the_graph_are_one_line_at_load(tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    model = art / "model.onnx"
    raw = bytearray(model.read_bytes())
    for i in range(100, len(raw), 997):
        raw[i] ^= 0xFF
    model.write_bytes(bytes(raw))
    code, out = cli("generate", art, "Hi", "--max-tokens", "2")
    assert code == 2
    assert f"error: onnxruntime cannot load artifact {art} (" in out
    assert f"`qwen-deploy inspect {art} --verify` names the damaged file" in out


def test_manifest_records_every_file(tiny_artifact):
    manifest = Manifest.load(tiny_artifact)
    on_disk = {
        p.relative_to(tiny_artifact).as_posix()
        for p in tiny_artifact.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", MARKER)
    }
    assert set(manifest.files) == on_disk
    assert all(
        manifest.files[n]["size"] == (tiny_artifact / n).stat().st_size for n in manifest.files
    )
    assert len(manifest.files["model.onnx.data"]["xxh3_128"]) == 32
