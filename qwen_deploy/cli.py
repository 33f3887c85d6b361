"""The `qwen-deploy` command line: one thin command per stage; the work lives in the modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import QwenDeployError


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


@main.command("random-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shape", type=click.Choice(["tiny", "0.5b", "fin-r1"]), default="tiny",
              show_default=True, help="Architecture numbers to use.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def random_checkpoint(out: Path, shape: str, dtype: str, seed: int, force: bool) -> None:
    """Write a random Qwen2 checkpoint (real Qwen tokenizer) to OUT, for trying the toolkit."""
    from .artifact import staged_output
    from .random_checkpoint import SHAPES, make_random_checkpoint

    layers, hidden, heads, kv, inter = SHAPES[shape]
    with staged_output(out, force) as tmp:
        make_random_checkpoint(tmp, layers=layers, hidden=hidden, heads=heads, kv_heads=kv,
                               intermediate=inter, dtype=dtype, seed=seed,
                               init_std=0.02 if shape != "tiny" else 0.5)
    click.echo(f"wrote random {shape} Qwen2 checkpoint to {out}", err=True)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Artifact folder to create.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--attention", type=click.Choice(["onnx", "gqa", "decomposed"]), default="onnx",
              show_default=True, help="onnx: standard Attention op (TensorRT fused attention); "
              "gqa: onnxruntime GroupQueryAttention; decomposed: MatMul/Softmax/MatMul.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(checkpoint: Path, out: Path, precision: str, attention: str, force: bool,
           quiet: bool) -> None:
    """Export a Hugging Face Qwen2 CHECKPOINT folder to an ONNX artifact with KV cache."""
    from .export import export_checkpoint

    manifest = export_checkpoint(checkpoint, out, precision=precision, attention=attention,
                                 force=force, progress=not quiet)
    m = manifest.model
    click.echo(f"exported {m.num_layers}-layer Qwen2 ({precision}, attention={attention}) to {out}",
               err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Show what an ARTIFACT's manifest says."""
    from .inspect import manifest_table
    from .manifest import Manifest

    manifest = Manifest.load(artifact)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
    else:
        click.echo(manifest_table(manifest, artifact))
