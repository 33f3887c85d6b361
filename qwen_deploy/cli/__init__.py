"""The `qwen-deploy` command line: one thin module of commands per stage; the work lives in the
stage packages, and the options every command shares are declared once (options.py)."""

from . import bench, checkpoint, export, generate, parity, quantize, serve, tensorrt  # noqa: F401
from .group import main

__all__ = ["main"]
