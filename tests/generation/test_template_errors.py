"""A chat template that does not compile stops `export` before any weight is written and
`serve` before it listens: one line naming the template's file and the line of the error."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen_deploy.cli import main
from qwen_deploy.manifest import MANIFEST

FIX = (
    "fix the template in the checkpoint (chat_template.jinja, or chat_template in "
    "tokenizer_config.json) and export it again."
)


@pytest.fixture
def small(checkpoint, tmp_path) -> Path:
    """A private copy of a small checkpoint without tokenizer files, to give a template."""
    return Path(shutil.copytree(checkpoint(vocab=1024, tokenizer=False), tmp_path / "ckpt"))


def _export_error(source: Path, out: Path) -> str:
    result = CliRunner().invoke(main, ["export", str(source), "-o", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    return result.stderr


def test_export_refuses_a_template_file_with_a_syntax_error(small, tmp_path):
    (small / "chat_template.jinja").write_text(
        "{% for m in messages %}\n{{ m.content }\n{% endfor %}"
    )
    assert _export_error(small, tmp_path / "out") == (
        f"error: the chat template in {small / 'chat_template.jinja'} has a Jinja syntax error "
        f"at line 2: unexpected '}}'; {FIX}\n"
    )


def test_export_refuses_a_tokenizer_config_template_with_a_syntax_error(small, tmp_path):
    template = "{{ bos_token }}\n{% for m in messages %}{{ m.content }}"
    (small / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert _export_error(small, tmp_path / "out") == (
        f"error: the chat template in {small / 'tokenizer_config.json'} field chat_template has "
        "a Jinja syntax error at line 2: Unexpected end of template. Jinja was looking for the "
        "following tags: 'endfor' or 'else'. The innermost block that needs to be closed is "
        f"'for'; {FIX}\n"
    )


def test_serve_refuses_an_artifact_whose_template_does_not_compile(tiny_artifact, tmp_path):
    """The server builds its generator, template included, before it listens; a regression
    would start serving, which the timeout turns into a failure."""
    broken = tmp_path / "artifact"
    broken.mkdir()
    for file in tiny_artifact.iterdir():
        if file.name != MANIFEST:
            (broken / file.name).symlink_to(file)
    manifest = json.loads((tiny_artifact / MANIFEST).read_text())
    manifest["chat_template"] = "{% if messages %}{{ messages[0].content }\n{% endif %}"
    (broken / MANIFEST).write_text(json.dumps(manifest))
    with socket.socket() as free:  # a port nothing listens on, should the server start
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    command = "from qwen_deploy.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", command, "serve", str(broken), "--port", port],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: the chat template has a Jinja syntax error at line 1: unexpected '}}'; {FIX}\n"
    )
