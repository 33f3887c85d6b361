"""Options that several commands share, declared once so they read and behave the same."""

from __future__ import annotations

from pathlib import Path

import click

from ..runtime.backend import PROVIDERS

force_option = click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")
threads_option = click.option("--threads", type=int, help="onnxruntime intra-op threads.")


def output_option(what: str):
    """-o/--output: the folder a command creates (refused if it exists, unless --force)."""
    return click.option(
        "-o", "--output", "out", type=click.Path(path_type=Path), required=True, help=what
    )


def json_option(what: str):
    """--json: machine output on stdout instead of the human table."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON.")


def provider_option(default: str | None = "cpu", help: str | None = None):
    """--provider: where onnxruntime runs the model."""
    return click.option(
        "--provider",
        type=click.Choice(list(PROVIDERS)),
        default=default,
        show_default=default is not None,
        help=help,
    )
