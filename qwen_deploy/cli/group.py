"""The `qwen-deploy` click group: errors of the toolkit become one line on stderr and exit 2."""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import QwenDeployError


class Group(click.Group):
    """Turns QwenDeployError into a one-line message on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QwenDeployError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="qwen-deploy")
def main() -> None:
    """Export Qwen2-architecture checkpoints to ONNX/TensorRT, check parity, and serve them."""
