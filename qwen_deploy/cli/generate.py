"""generate and chat: one artifact on this machine, streamed to the terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .group import main
from .options import (
    batch_invariant_option,
    json_option,
    max_memory_option,
    provider_option,
    speculative_options,
    threads_option,
)


def _sampling_options(command):
    """Options shared by generate and chat; unset ones keep the artifact's generation_config."""
    options = [
        click.option("--temperature", type=float, help="0 = greedy."),
        click.option("--top-k", type=int, help="0 = off."),
        click.option("--top-p", type=float),
        click.option("--min-p", type=float),
        click.option("--repetition-penalty", type=float),
        click.option("--presence-penalty", type=float),
        click.option("--frequency-penalty", type=float),
        click.option("--seed", type=int, help="Makes sampling reproducible."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        provider_option(),
        threads_option,
        click.option("--system", help="System message."),
        batch_invariant_option,
        max_memory_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _speculation(
    generator,
    prompt_lookup: bool,
    draft: Path | None,
    draft_tokens: int | None,
    provider: str,
    threads: int | None,
) -> dict:
    """Generator.stream's drafter and draft_tokens for the chosen drafter (none: no drafter)."""
    from ..generation.speculative import Speculator

    vocab = generator.manifest.model.vocab_size
    speculator = Speculator.open(vocab, prompt_lookup, draft, draft_tokens, provider, threads)
    return {"drafter": speculator.drafter(), "draft_tokens": speculator.draft_tokens}


def _generator_and_params(
    artifact: Path, provider: str, threads: int | None, sampling: dict, prefix_cache_bytes: int = 0
):
    """The loaded artifact and the sampling options; `sampling` also carries
    --batch-invariant, which the generator takes."""
    from ..generation.generator import Generator
    from ..generation.sampling import SamplingParams
    from ..manifest import Artifact

    sampling["stop"] = list(sampling["stop"]) or None
    batch_invariant = sampling.pop("batch_invariant")
    max_memory = sampling.pop("max_memory")
    opened = Artifact.open(artifact)
    params = SamplingParams.from_defaults(opened.manifest, **sampling)  # before the model loads
    generator = Generator(
        opened,
        provider=provider,
        threads=threads,
        prefix_cache_bytes=prefix_cache_bytes,
        batch_invariant=batch_invariant,
        max_memory=max_memory,
    )
    return generator, params


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompt")
@_sampling_options
@speculative_options
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@json_option("the whole result")
def generate(
    artifact: Path,
    prompt: str,
    provider: str,
    threads: int | None,
    system: str | None,
    prompt_lookup: bool,
    draft: Path | None,
    draft_tokens: int | None,
    raw: bool,
    as_json: bool,
    **sampling,
) -> None:
    """Complete PROMPT with ARTIFACT, streaming the answer (reasoning goes to stderr)."""
    import dataclasses

    generator, params = _generator_and_params(artifact, provider, threads, sampling)
    speculation = _speculation(generator, prompt_lookup, draft, draft_tokens, provider, threads)
    if raw:
        request = {"prompt": prompt}
    else:
        system_turn = [{"role": "system", "content": system}] if system else []
        request = {"messages": [*system_turn, {"role": "user", "content": prompt}]}
    if as_json:
        result = generator.generate(**request, params=params, **speculation)
        click.echo(json.dumps(dataclasses.asdict(result), ensure_ascii=False))
        return
    for delta in generator.stream(**request, params=params, **speculation):
        if delta.reasoning_content:
            click.secho(delta.reasoning_content, nl=False, err=True, dim=True)
        click.echo(delta.content, nl=False)
    click.echo()


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@_sampling_options
@speculative_options
def chat(
    artifact: Path,
    provider: str,
    threads: int | None,
    system: str | None,
    prompt_lookup: bool,
    draft: Path | None,
    draft_tokens: int | None,
    **sampling,
) -> None:
    """Interactive multi-turn chat with ARTIFACT (/exit or end of input quits, /reset clears)."""
    from ..generation.chat import COMMANDS, chat_loop
    from ..generation.engine import PREFIX_CACHE_GB

    # each turn starts with the conversation so far: its KV is kept, not prefilled again
    cache = int(PREFIX_CACHE_GB * 2**30)
    generator, params = _generator_and_params(artifact, provider, threads, sampling, cache)
    speculation = _speculation(generator, prompt_lookup, draft, draft_tokens, provider, threads)
    stdin = sys.stdin
    interactive = stdin.isatty()
    if interactive:
        click.echo(f"chatting with {artifact} ({COMMANDS})", err=True)

    def lines():
        while True:
            if interactive:
                click.echo("> ", nl=False)
            line = stdin.readline()
            if not line:
                return
            yield line

    styles = {"reasoning": {"dim": True}, "notice": {"fg": "yellow"}, "error": {"fg": "red"}}

    def write(kind: str, text: str) -> None:
        if kind == "end":
            click.echo()
        elif kind in ("notice", "error"):
            click.secho(f"{kind}: {text}" if kind == "error" else text, err=True, **styles[kind])
        else:
            click.secho(text, nl=False, **styles.get(kind, {}))

    chat_loop(generator, params, lines(), write, system=system, speculation=speculation)
