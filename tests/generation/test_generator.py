"""Generation against transformers' generate, streaming, stops, reasoning, context limit, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import Qwen2ForCausalLM

from qwen_deploy.bench import BenchConfig, format_report, run_bench
from qwen_deploy.cli import main
from qwen_deploy.errors import QwenDeployError
from qwen_deploy.generation.chat import chat_loop
from qwen_deploy.generation.generator import Generator
from qwen_deploy.generation.requests import ContextLengthError
from qwen_deploy.generation.sampling import SamplingParams
from qwen_deploy.generation.sequence import SequenceState
from qwen_deploy.manifest import Manifest

PROMPTS = ["The capital of France is", "def fibonacci(n):", "资本市场的风险"]
FORMS = {  # checkpoint kwargs, export kwargs
    "untied-onnx": ({}, {}),
    "tied-gqa": ({"tie_word_embeddings": True}, {"attention": "gqa"}),
    "untied-decomposed": ({}, {"attention": "decomposed"}),
}
NEW_TOKENS = 12


def reference_greedy(model, prompt_ids: list[int], eos: list[int]) -> list[int]:
    """transformers' greedy continuation, cut after its first EOS."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    new = out[0, len(prompt_ids) :].tolist()
    for i, token in enumerate(new):
        if token in eos:
            return new[: i + 1]
    return new


@pytest.fixture(scope="module")
def tiny_generator(tiny_artifact) -> Generator:
    """One loaded Generator for the tests that only read from it (loading costs seconds)."""
    return Generator(tiny_artifact)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run 10x faster on one torch thread than on contended shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(FORMS))
def form(request, checkpoint, artifact, one_torch_thread):
    ckpt_kwargs, export_kwargs = FORMS[request.param]
    model = Qwen2ForCausalLM.from_pretrained(checkpoint(**ckpt_kwargs), dtype=torch.float32)
    return model.eval(), Generator(artifact(ckpt_kwargs, **export_kwargs))


def test_greedy_equals_transformers_single_and_left_padded_batch(form):
    model, gen = form
    eos = gen.manifest.eos_token_ids
    prompts = [gen.prompt_ids(p) for p in PROMPTS]
    prompts.append(gen.prompt_ids(messages=[{"role": "user", "content": "What is a bond?"}]))
    assert len({len(p) for p in prompts}) == len(prompts)  # the batch really is left-padded
    expected = [reference_greedy(model, p, eos) for p in prompts]
    for ids, want in zip(prompts, expected, strict=True):
        assert gen.generate(ids, temperature=0, max_tokens=NEW_TOKENS).token_ids == want
    params = [SamplingParams.from_defaults(gen.manifest, temperature=0, max_tokens=NEW_TOKENS)] * 4
    batch = gen.generate_batch(prompts, params)
    assert [r.token_ids for r in batch] == expected
    assert [r.prompt_tokens for r in batch] == [len(p) for p in prompts]


def test_streaming_gives_the_same_text_and_tokens(tiny_generator):
    gen = tiny_generator
    kwargs = dict(temperature=0.9, top_k=40, seed=7, max_tokens=24)
    whole = gen.generate("Tell me about markets", **kwargs)
    deltas = list(gen.stream("Tell me about markets", **kwargs))
    assert "".join(d.text for d in deltas) == whole.text
    assert [d.token_id for d in deltas] == whole.token_ids
    assert whole.text == gen.tokenizer.decode(whole.token_ids, skip_special_tokens=True)
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert whole.completion_tokens == 24 and whole.finish_reason == "length"
    assert (
        gen.generate("Tell me about markets", **{**kwargs, "seed": 8}).token_ids != whole.token_ids
    )


def test_stop_string_found_across_tokens_and_cut_from_the_text(tiny_generator):
    gen = tiny_generator
    full = gen.generate("Once upon a time", temperature=0, max_tokens=20)
    tokens = [gen.tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the end of token 4 and the start of token 5
    k = next(i for i in range(3, 15) if len(tokens[i].strip()) > 1 and len(tokens[i + 1]) > 1)
    stop = tokens[k][-2:] + tokens[k + 1][:2]
    cut = full.text.index(stop)
    stopped = gen.generate("Once upon a time", temperature=0, max_tokens=20, stop=[stop, "zzzq"])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    deltas = list(gen.stream("Once upon a time", temperature=0, max_tokens=20, stop=[stop]))
    assert "".join(d.text for d in deltas) == full.text[:cut]


def test_sequence_state_stop_ids_length_and_held_back_text(tiny_generator):
    tok = tiny_generator.tokenizer
    ids = tok.encode("Hello world, this is a test of stop strings")
    state = SequenceState([1, 2], SamplingParams(stop=["s is a", "test"]), tok, reasoning=False)
    texts = []
    for t in ids:
        texts.append(state.append(t).text)
        if state.finished:
            break
    assert state.finished and state.finish_reason == "stop"
    assert "".join(texts) == state.text == "Hello world, thi"
    assert len(state.completion_ids) < len(ids)  # stopped as soon as the stop string completed

    eos = tok.token_to_id("<|im_end|>")
    state = SequenceState([1], SamplingParams(stop_token_ids=[eos]), tok, reasoning=False)
    for t in tok.encode("Done."):
        assert state.append(t).finish_reason is None
    last = state.append(eos)
    assert (last.finish_reason, last.text, state.text) == ("stop", "", "Done.")
    assert state.completion_ids[-1] == eos

    state = SequenceState([1], SamplingParams(max_tokens=3), tok, reasoning=False)
    reasons = [state.append(t).finish_reason for t in tok.encode("one two three")]
    assert reasons == [None, None, "length"]
    with pytest.raises(RuntimeError):
        state.append(5)


def test_sequence_state_splits_reasoning_also_when_the_prompt_opened_think(tiny_generator):
    tok = tiny_generator.tokenizer
    eos = tok.token_to_id("<|im_end|>")
    output = [*tok.encode("<think>\nrisk is high\n</think>\n\nBuy bonds."), eos]
    state = SequenceState(
        tok.encode("<|im_start|>assistant\n"), SamplingParams(stop_token_ids=[eos]), tok, True
    )
    deltas = [state.append(t) for t in output]
    assert deltas[-1].finish_reason == "stop"
    assert "".join(d.reasoning_content for d in deltas) == "risk is high" == state.reasoning_content
    assert "".join(d.content for d in deltas) == "Buy bonds." == state.content
    plain = SequenceState([1], SamplingParams(), tok, False)
    for t in output[:-1]:
        plain.append(t)
    assert plain.content == plain.text == "<think>\nrisk is high\n</think>\n\nBuy bonds."
    opened = SequenceState(
        tok.encode("<|im_start|>assistant\n<think>\n"),
        SamplingParams(max_tokens=len(tok.encode("plan\n</think>\n\nSell."))),
        tok,
        True,
    )
    for t in tok.encode("plan\n</think>\n\nSell."):
        opened.append(t)
    assert opened.finish_reason == "length"
    assert (opened.reasoning_content, opened.content) == ("plan", "Sell.")


def edited_artifact(artifact, out, edit):
    """The artifact's files, linked, under a manifest changed by `edit(manifest dict)`."""
    out.mkdir()
    for file in artifact.iterdir():
        if file.name != "manifest.json":
            (out / file.name).symlink_to(file)
    manifest = json.loads((artifact / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_context_limit_comes_from_the_manifest(tiny_artifact, tmp_path):
    short = edited_artifact(
        tiny_artifact,
        tmp_path / "short",
        lambda m: m["model"].update(max_position_embeddings=32),
    )
    gen = Generator(short)
    with pytest.raises(
        ContextLengthError,
        match="maximum context length is 32 tokens, but the prompt has 32 tokens",
    ):
        gen.generate(list(range(100, 132)), max_tokens=4)
    clipped = gen.generate(list(range(100, 128)), temperature=0, max_tokens=100, stop_token_ids=[])
    assert (clipped.completion_tokens, clipped.finish_reason) == (4, "length")
    with pytest.raises(QwenDeployError, match="outside"):
        gen.generate([10**7])
    with pytest.raises(QwenDeployError, match="either a prompt or chat messages"):
        gen.generate()


def test_cli_generate_streams_the_generators_text(tiny_artifact, tiny_generator):
    expected = tiny_generator.generate(
        messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=8
    )
    result = CliRunner().invoke(
        main, ["generate", str(tiny_artifact), "Hi", "--temperature", "0", "--max-tokens", "8"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == expected.content + "\n"
    raw = CliRunner().invoke(
        main,
        [
            "generate",
            str(tiny_artifact),
            "Hi",
            "--raw",
            "--json",
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "--max-tokens",
            "6",
        ],
    )
    data = json.loads(raw.stdout)
    again = tiny_generator.generate("Hi", temperature=0.8, seed=3, max_tokens=6)
    assert data["token_ids"] == again.token_ids and data["text"] == again.text
    bad = CliRunner().invoke(main, ["generate", str(tiny_artifact), "Hi", "--top-p", "3"])
    assert bad.exit_code == 2 and "top_p=3.0 is out of range" in bad.stderr
    left_padded = CliRunner().invoke(
        main, ["generate", str(tiny_artifact), "Hi", "--batch-invariant"]
    )
    assert left_padded.exit_code == 2 and "Traceback" not in left_padded.output
    assert left_padded.stderr.count("\n") == 1 and "--attention onnx" in left_padded.stderr


def test_cli_chat_keeps_the_conversation(tiny_artifact, tiny_generator):
    gen = tiny_generator
    first = gen.generate(
        messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=5
    )
    second = gen.generate(
        messages=[
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": "More"},
        ],
        temperature=0,
        max_tokens=5,
    )
    result = CliRunner().invoke(
        main,
        ["chat", str(tiny_artifact), "--temperature", "0", "--max-tokens", "5"],
        input="Hello\nMore\n",
    )  # then EOF
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{first.content}\n{second.content}\n"


def test_chat_loop_commands_and_context_errors(tiny_generator):
    params = tiny_generator.sampling_params(temperature=0, max_tokens=3)
    out: list[tuple[str, str]] = []
    lines = ["Hi", "/reset", "/help", "x " * 5000, "Hi", "/exit", "never read"]
    chat_loop(tiny_generator, params, lines, lambda kind, text: out.append((kind, text)))
    answers, current = [], []
    for kind, text in out:
        if kind == "content":
            current.append(text)
        elif kind == "end":
            answers, current = [*answers, "".join(current)], []
    alone = tiny_generator.generate(messages=[{"role": "user", "content": "Hi"}], params=params)
    assert answers == [alone.content, alone.content]  # /reset: the second "Hi" starts afresh
    kinds = [k for k, _ in out if k in ("notice", "error")]
    assert kinds == ["notice", "notice", "error"]
    assert "context length" in next(t for k, t in out if k == "error")


def test_random_prompts_batch_rows_match_their_solo_runs(tiny_generator):
    gen = tiny_generator
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 150000, n)] for n in (3, 11, 6)]
    params = [SamplingParams(temperature=0.7, top_k=20, seed=s, max_tokens=6) for s in (1, 2, 3)]
    batch = gen.generate_batch(prompts, params)
    solo = [gen.generate(p, params=q) for p, q in zip(prompts, params, strict=True)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]


@pytest.mark.parametrize("attention", ["onnx", "gqa"])
def test_finished_rows_leave_the_batch_and_the_rest_keep_their_tokens(artifact, attention):
    gen = Generator(artifact(attention=attention))
    rng = np.random.default_rng(1)
    # the longest prompt ends first: its padding-free columns go, the others' left padding too
    prompts = [[int(t) for t in rng.integers(0, 150000, n)] for n in (12, 3, 7)]
    params = [SamplingParams(temperature=0, max_tokens=n, stop_token_ids=[]) for n in (2, 9, 5)]
    solo = [gen.generate(p, params=q).token_ids for p, q in zip(prompts, params, strict=True)]
    batch_sizes = []
    forward = gen.backend.forward

    def recording(ids, *args, **options):
        batch_sizes.append(ids.shape[0])
        return forward(ids, *args, **options)

    gen.backend.forward = recording
    try:
        batch = gen.generate_batch(prompts, params)
    finally:
        gen.backend.forward = forward
    assert [r.token_ids for r in batch] == solo
    assert [len(t) for t in solo] == [2, 9, 5]
    # each prompt prefilled alone, then one decode step per token for the rows still running
    assert batch_sizes == [1, 1, 1, 3] + [2] * 3 + [1] * 4


def test_a_template_that_opens_think_makes_the_output_reasoning(tiny_artifact, tmp_path):
    opens = "{% if add_generation_prompt %}<think>\n{% endif %}"
    folder = edited_artifact(
        tiny_artifact,
        tmp_path / "thinks",
        lambda m: m.update(chat_template=m["chat_template"] + opens),
    )
    gen = Generator(folder)
    messages = [{"role": "user", "content": "Is this bond risky?"}]
    assert gen.tokenizer.decode(gen.prompt_ids(messages=messages)).endswith("<think>\n")
    result = gen.generate(messages=messages, temperature=0, max_tokens=6)
    assert "</think>" not in result.text  # random weights never close the block
    assert (result.reasoning_content, result.content) == (result.text.strip("\n"), "")
    out: list[tuple[str, str]] = []
    chat_loop(
        gen,
        gen.sampling_params(temperature=0, max_tokens=6),
        ["Is this bond risky?"],
        lambda kind, text: out.append((kind, text)),
    )
    assert "".join(t for k, t in out if k == "reasoning") == result.reasoning_content
    assert not [t for k, t in out if k == "content"]


def test_bench_measures_the_artifact_and_counts_the_weights_a_token_reads(tiny_artifact):
    from safetensors.numpy import load_file

    config = BenchConfig(prompt_len=8, new_tokens=3, repeats=1, batches=(2,), bandwidth_probe_mb=16)
    report = run_bench(tiny_artifact, config=config)
    ours = report["engines"]["qwen-deploy"]
    assert ours["decode_tok_s"] > 0 and ours["ttft_s"] > 0 and ours["peak_rss_mb"] > 0
    assert set(ours["batches"]) == {"2"}
    assert report["ratios"]["aggregate_decode_b2_vs_b1"] == pytest.approx(
        ours["batches"]["2"]["aggregate_decode_tok_s"] / ours["decode_tok_s"]
    )
    source = Path(Manifest.load(tiny_artifact).source["path"])
    weights = load_file(str(source / "model.safetensors"))
    read = sum(w.nbytes for n, w in weights.items() if n != "model.embed_tokens.weight")
    # everything but the embedding table, plus the graph's small RoPE tables and constants
    assert read <= report["weight_bytes_per_token"] <= read * 1.02
    assert "qwen-deploy batch 2: aggregate" in format_report(report)
