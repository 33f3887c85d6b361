"""serve (OpenAI-compatible HTTP) and triton (a Triton model repository)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..generation.engine import PREFILL_CHUNK, PREFIX_CACHE_GB
from .group import main
from .options import (
    batch_invariant_option,
    force_option,
    json_option,
    max_memory_option,
    output_option,
    provider_option,
    speculative_options,
    threads_option,
)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (0.0.0.0 exposes the server to the network).",
)
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port, 1-65535.")
@click.option("--model-name", help="Model id clients send (default: the artifact folder's name).")
@click.option(
    "--api-key",
    envvar="QWEN_DEPLOY_API_KEY",
    help="Require 'Authorization: Bearer KEY' on every route but /health, /docs included (or "
    "set QWEN_DEPLOY_API_KEY).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="A Host name a keyless localhost server also answers (repeatable); it answers only "
    "localhost, 127.0.0.1 and [::1] otherwise, against DNS rebinding.",
)
@click.option("--no-docs", is_flag=True, help="Serve no /docs and /openapi.json.")
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Requests decoded together; more wait in a queue.",
)
@provider_option()
@threads_option
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1024),
    default=4 * 1024 * 1024,
    show_default=True,
    help="Larger request bodies get 413 before they are parsed.",
)
@click.option(
    "--prefix-cache-gb",
    type=click.FloatRange(min=0),
    default=PREFIX_CACHE_GB,
    show_default=True,
    help="Host memory for the KV of earlier prompts: a request that starts like one of them "
    "(a conversation's history, a shared system prompt) prefills only what is new; 0 turns it off.",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(min=2),
    default=PREFILL_CHUNK,
    show_default=True,
    help="Prompt tokens prefilled per step beside the running streams' decode (inside the same "
    "forward for gqa artifacts on CPU): what a new prompt slows their tokens by; smaller keeps "
    "streams smoother, larger gets newcomers their first token sooner. While no stream runs, "
    "prompts are prefilled at least 256 tokens a step.",
)
@click.option(
    "--kv-cache-gb",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Memory the requests' KV caches may take at their longest; a request that would pass "
    "it waits, one that cannot fit alone is a 400  [default: half the memory free after loading]",
)
@batch_invariant_option
@max_memory_option
@speculative_options
def serve(
    artifact: Path,
    host: str,
    port: int,
    model_name: str | None,
    api_key: str | None,
    allowed_hosts: tuple[str, ...],
    no_docs: bool,
    max_batch: int,
    provider: str,
    threads: int | None,
    max_body_bytes: int,
    prefix_cache_gb: float,
    prefill_chunk: int,
    kv_cache_gb: float | None,
    batch_invariant: bool | None,
    max_memory: float | None,
    prompt_lookup: bool,
    draft: Path | None,
    draft_tokens: int | None,
) -> None:
    """Serve ARTIFACT over an OpenAI-compatible HTTP API with continuous batching.

    --prompt-lookup or --draft makes speculative decoding the requests' default; a request
    chooses with "speculative": "none" | "prompt_lookup" | "draft", and OpenAI's "prediction"
    (predicted output) drafts from its text."""
    from ..serving.server import API_KEY_ENV
    from ..serving.server import serve as run_server

    if api_key is None and os.environ.get(API_KEY_ENV) == "":
        api_key = ""  # click reads an empty variable as unset: refused like an empty --api-key
    run_server(
        artifact,
        host=host,
        port=port,
        model_name=model_name,
        api_key=api_key,
        max_batch=max_batch,
        provider=provider,
        threads=threads,
        max_body_bytes=max_body_bytes,
        prompt_lookup=prompt_lookup,
        draft=draft,
        draft_tokens=draft_tokens,
        allowed_hosts=allowed_hosts,
        docs=not no_docs,
        prefix_cache_gb=prefix_cache_gb,
        prefill_chunk=prefill_chunk,
        kv_cache_gb=kv_cache_gb,
        batch_invariant=batch_invariant,
        max_memory=max_memory,
    )


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@output_option("Model repository folder to create.")
@click.option("--name", help="Text model name; the graph is NAME_decoder [artifact folder name].")
@click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
    help="tensorrt needs an engine artifact from `build`.",
)
@click.option(
    "--max-batch",
    type=int,
    default=8,
    show_default=True,
    help="The decoder's max_batch_size (0 = no batching).",
)
@click.option(
    "--instances", type=int, default=1, show_default=True, help="Model instances of each model."
)
@provider_option(None, "Where the models run [cpu; cuda for tensorrt].")
@click.option(
    "--python-env",
    type=click.Path(path_type=Path),
    help="Virtual env for the Python-backend model (EXECUTION_ENV_PATH).",
)
@batch_invariant_option
@force_option
@json_option("what was written")
def triton(
    artifact: Path,
    out: Path,
    name: str | None,
    backend: str,
    max_batch: int,
    instances: int,
    provider: str | None,
    python_env: Path | None,
    batch_invariant: bool | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write a Triton Inference Server model repository for ARTIFACT."""
    from ..serving.triton_repo import write_repository

    repo = write_repository(
        artifact,
        out,
        name=name,
        backend=backend,
        max_batch=max_batch,
        instances=instances,
        provider=provider,
        python_env=python_env,
        batch_invariant=batch_invariant,
        force=force,
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "path": str(repo.path),
                    "generate_model": repo.generate_model,
                    "decoder_model": repo.decoder_model,
                    "backend": repo.backend,
                    "plugins": repo.plugins,
                }
            )
        )
    click.echo(
        f"wrote Triton repository {out}: models {repo.generate_model} (python, "
        f"decoupled) and {repo.decoder_model} ({backend}); see {out}/README.md",
        err=True,
    )
