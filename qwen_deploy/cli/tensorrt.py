"""TensorRT commands: check-trt (pre-flight) and build (engine artifact)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .group import main
from .options import force_option, json_option, output_option, quiet_option


@main.command("check-trt")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--trt-version",
    default="10.15",
    show_default=True,
    help="TensorRT version to check against (>= 10.14).",
)
@json_option("the findings")
def check_trt(model: Path, trt_version: str, as_json: bool) -> None:
    """Will TensorRT's ONNX parser import MODEL (artifact folder or .onnx)? Exit 1 on errors."""
    from ..tensorrt.preflight import check_path, report_json

    report = check_path(model, trt_version=trt_version)
    click.echo(report_json(report) if as_json else report.text())
    if not report.passed:
        sys.exit(1)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@output_option("Engine artifact folder to create.")
@click.option("--max-batch", type=int, default=8, show_default=True)
@click.option(
    "--max-input-len",
    type=int,
    default=2048,
    show_default=True,
    help="Longest prompt (tokens) one prefill step takes.",
)
@click.option(
    "--max-seq-len",
    type=int,
    default=4096,
    show_default=True,
    help="Longest context: prompt + generated tokens.",
)
@click.option("--opt-batch", type=int, default=None, help="Batch TensorRT tunes for [1].")
@click.option(
    "--opt-input-len",
    type=int,
    default=None,
    help="Prompt length TensorRT tunes for [min(512, max-input-len)].",
)
@click.option(
    "--workspace-gb",
    type=float,
    default=None,
    help="Builder workspace limit in GiB [TensorRT's default: the GPU's memory].",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Timing cache file: read if present, updated after the build.",
)
@click.option(
    "--plugin-lib",
    "plugin_libs",
    type=click.Path(path_type=Path),
    multiple=True,
    help="TensorRT plugin library to load before parsing (repeatable).",
)
@force_option
@quiet_option
def build(
    artifact: Path,
    out: Path,
    max_batch: int,
    max_input_len: int,
    max_seq_len: int,
    opt_batch: int | None,
    opt_input_len: int | None,
    workspace_gb: float | None,
    timing_cache: Path | None,
    plugin_libs: tuple[Path, ...],
    force: bool,
    quiet: bool,
) -> None:
    """Build a TensorRT engine artifact from an fp16 or Q/DQ INT8 ONNX ARTIFACT."""
    from ..tensorrt.builder import BuildOptions, build_engine

    options = BuildOptions(
        max_batch,
        max_input_len,
        max_seq_len,
        opt_batch,
        opt_input_len,
        workspace_gb,
        timing_cache,
        tuple(plugin_libs),
    )
    manifest = build_engine(artifact, out, options, force=force, progress=not quiet)
    e = manifest.engine
    click.echo(
        f"built TensorRT {e.tensorrt_version} engine for {e.device.name} "
        f"(sm {e.device.compute_capability}) in {e.build_seconds} s: {out}",
        err=True,
    )
