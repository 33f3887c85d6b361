"""bench: speed and memory of an artifact against its peers."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .group import main
from .options import json_option


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    help="Source checkpoint: adds transformers eager generate as a baseline.",
)
@click.option("--prompt-len", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--threads", type=int, help="Intra-op threads for every engine [their default].")
@click.option(
    "--genai-dir",
    type=click.Path(path_type=Path),
    help="Keep (or reuse) onnxruntime-genai's export here [a temp folder].",
)
@click.option("--no-genai", is_flag=True, help="Skip the onnxruntime-genai baseline.")
@click.option(
    "--llama-gguf",
    type=click.Path(path_type=Path),
    multiple=True,
    help="A GGUF file of the same model: adds llama.cpp (llama-cpp-python) as a peer; repeatable.",
)
@click.option(
    "--openvino",
    type=click.Path(path_type=Path),
    multiple=True,
    help="An OpenVINO model folder of the same model (optimum-cli export openvino): adds "
    "openvino-genai as a peer; repeatable.",
)
@click.option(
    "--prompt-lookup", is_flag=True, help="Compare speculative decoding by prompt lookup."
)
@click.option(
    "--draft",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Compare speculative decoding with this draft artifact; repeatable.",
)
@click.option(
    "--draft-tokens",
    type=click.IntRange(1, 32),
    multiple=True,
    help="k for the speculative variants; repeatable [each drafter's default: 8 for prompt "
    "lookup, 12 for a draft artifact].",
)
@click.option(
    "--speculative-tokens",
    type=click.IntRange(min=2),
    default=128,
    show_default=True,
    help="Tokens each speculative workload answer gets.",
)
@json_option("the whole report")
def bench(
    artifact: Path,
    reference: Path | None,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    threads: int | None,
    genai_dir: Path | None,
    no_genai: bool,
    llama_gguf: tuple[Path, ...],
    openvino: tuple[Path, ...],
    prompt_lookup: bool,
    draft: tuple[Path, ...],
    draft_tokens: tuple[int, ...],
    speculative_tokens: int,
    as_json: bool,
) -> None:
    """Time to first token, decode tokens/s (batch 1, 4, 8), peak RSS of ARTIFACT vs its peers
    (transformers, onnxruntime-genai, llama.cpp, OpenVINO); speculative decoding against plain
    decoding."""
    from ..bench import BenchConfig, format_report, run_bench

    peers = ("transformers",) if no_genai else ("transformers", "onnxruntime-genai")
    report = run_bench(
        artifact,
        reference,
        BenchConfig(
            prompt_len,
            new_tokens,
            repeats,
            threads=threads,
            prompt_lookup=prompt_lookup,
            drafts=tuple(str(d) for d in draft),
            draft_tokens=draft_tokens,
            speculative_tokens=speculative_tokens,
        ),
        genai_dir=genai_dir,
        peers=peers,
        log=lambda m: click.echo(m, err=True),
        llama_ggufs=llama_gguf,
        openvino_dirs=openvino,
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
