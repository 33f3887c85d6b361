"""export, and inspect (what an artifact's manifest says)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .group import main
from .options import force_option, json_option, output_option, quiet_option


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@output_option("Artifact folder to create.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--attention",
    type=click.Choice(["onnx", "gqa", "decomposed"]),
    default="onnx",
    show_default=True,
    help="onnx: standard Attention op (TensorRT fused attention); "
    "gqa: onnxruntime GroupQueryAttention; decomposed: MatMul/Softmax/MatMul.",
)
@force_option
@quiet_option
def export(
    checkpoint: Path, out: Path, precision: str, attention: str, force: bool, quiet: bool
) -> None:
    """Export a Hugging Face Qwen2 CHECKPOINT folder to an ONNX artifact with KV cache."""
    from ..checkpoint.huggingface import Checkpoint
    from ..export import export_checkpoint
    from ..generation.chat_template import ChatTemplate

    # the template is compiled before any weight is written: a syntax error would otherwise
    # surface only at generate/serve (export may not import generation: docs/DESIGN.md, Layout)
    ckpt = Checkpoint(checkpoint)
    if ckpt.chat_template:
        ChatTemplate(ckpt.chat_template, {}, f"the chat template in {ckpt.chat_template_origin}")
    manifest = export_checkpoint(
        checkpoint, out, precision=precision, attention=attention, force=force, progress=not quiet
    )
    m = manifest.model
    click.echo(
        f"exported {m.num_layers}-layer Qwen2 ({precision}, attention={attention}) to {out}",
        err=True,
    )


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@json_option("the manifest")
@click.option(
    "--verify",
    is_flag=True,
    help="Read every file and check its hash against the manifest (a full read).",
)
@quiet_option
def inspect(artifact: Path, as_json: bool, verify: bool, quiet: bool) -> None:
    """Show what an ARTIFACT's manifest says (its files' sizes are always checked)."""
    from ..inspect import manifest_table
    from ..manifest import Manifest

    manifest = Manifest.load(artifact)
    if verify:
        manifest.verify(artifact, progress=not quiet)
        click.echo(f"verified {len(manifest.files)} files of {artifact}: intact", err=True)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
    else:
        click.echo(manifest_table(manifest, artifact))
