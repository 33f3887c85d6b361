"""Calibration files `quantize` cannot use are refused before any work: one line naming the
file and the problem (the byte offset of bad encoding, the line of a malformed record)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen_deploy.cli import main

SHAPE = '\'messages\' must be a non-empty list of {"role": "...", "content": "..."} objects'


def _quantize_error(artifact: Path, calibration: Path, out: Path) -> str:
    command = ["quantize", str(artifact), "-o", str(out), "--mode", "int8-weight", "--quiet"]
    result = CliRunner().invoke(main, [*command, "--calibration", str(calibration)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    return result.stderr


def test_non_utf8_calibration_file(tiny_artifact, tmp_path):
    calibration = tmp_path / "calib.jsonl"
    calibration.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    assert _quantize_error(tiny_artifact, calibration, tmp_path / "out") == (
        f"error: {calibration} is not UTF-8 text: byte 0xe9 at offset 13 (invalid continuation "
        "byte); save the file as UTF-8.\n"
    )


@pytest.mark.parametrize(
    "record, got",
    [
        ('{"messages": "hi"}', '"hi"'),
        ('{"messages": []}', "[]"),
        ('{"messages": [{"role": "user"}]}', '[{"role": "user"}]'),
        ('{"messages": [["user", "hi"]]}', '[["user", "hi"]]'),
    ],
)
def test_messages_that_are_not_chat_messages(tiny_artifact, tmp_path, record, got):
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text('{"text": "fine"}\n' + record + "\n")
    assert _quantize_error(tiny_artifact, calibration, tmp_path / "out") == (
        f"error: {calibration} line 2: {SHAPE} with string values; got {got}.\n"
    )


def test_text_that_is_not_a_string(tiny_artifact, tmp_path):
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text('{"text": ["a", "b"]}\n')
    assert _quantize_error(tiny_artifact, calibration, tmp_path / "out") == (
        f'error: {calibration} line 1: \'text\' must be a string; got ["a", "b"].\n'
    )
