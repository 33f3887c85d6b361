"""Continuous batching: rows joining and leaving a running batch get the tokens they get alone."""

from __future__ import annotations

import asyncio

import pytest

from qwen_deploy.errors import QwenDeployError
from qwen_deploy.generation.engine import BatchEngine, KVBudgetError
from qwen_deploy.generation.generator import Generator
from qwen_deploy.generation.requests import ContextLengthError
from qwen_deploy.generation.sampling import SamplingParams, TokenLogprob, token_logprob
from qwen_deploy.generation.speculative import PromptLookup
from qwen_deploy.runtime.decode import Batch

TEXTS = [
    "Hello",
    "What is a convertible bond? Explain it to a first-year finance student, with an example "
    "of the conversion price and what happens when the share price rises.",
    "1 2 3",
    "你好，世界！请介绍一下你自己。",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
]


@pytest.fixture(scope="module", params=["onnx", "gqa"])
def generator(request, artifact) -> Generator:
    return Generator(artifact(attention=request.param))


def _params(generator: Generator, **overrides) -> SamplingParams:
    return SamplingParams.from_defaults(generator.manifest, **overrides)


def _run(engine: BatchEngine, schedule: dict[int, list[tuple[list[int], SamplingParams]]]):
    """Drive the engine step by step, adding requests at the scheduled steps; deltas per request."""
    outputs: list[list] = []
    step = 0
    while True:
        for prompt, params in schedule.get(step, []):
            outputs.append([])
            engine.add(engine.generator.prepare(prompt=prompt, params=params), outputs[-1].append)
        busy = engine.step()
        step += 1
        if not busy and step > max(schedule, default=0):
            return outputs


def test_joining_at_different_steps_equals_unbatched_greedy(generator):
    prompts = [generator.prompt_ids(prompt=t) for t in TEXTS]
    params = [
        _params(generator, temperature=0, max_tokens=n, stop_token_ids=[])
        for n in (12, 7, 15, 9, 11)
    ]
    expected = [
        generator.generate(prompt=p, params=q) for p, q in zip(prompts, params, strict=True)
    ]
    jobs = list(zip(prompts, params, strict=True))
    # max_batch 4: the 30-token prompt joins at step 2 and is prefilled in chunks of 16 (the
    # per-step budget) beside decode steps (inside them where the backend runs mixed steps);
    # newcomers prefill on rows of their own, the last waits for a slot
    engine = BatchEngine(generator, max_batch=4, prefill_chunk=16)
    outputs, calls = _forwards(
        generator, lambda: _run(engine, {0: [jobs[0]], 2: [jobs[1]], 5: jobs[2:]})
    )
    assert ((1, len(prompts[1]) - 16), 16) in calls  # second chunk of the long prompt
    assert all(rows == 1 for (rows, seq), _ in calls if seq > 1)  # every prefill alone
    assert max(shape[0] for shape, _ in calls) == 4
    assert (engine.stats["mixed_steps"] > 0) == generator.backend.capabilities.mixed_steps
    for deltas, result in zip(outputs, expected, strict=True):
        assert [d.token_id for d in deltas] == result.token_ids
        assert "".join(d.text for d in deltas) == result.text
        assert deltas[-1].finish_reason == result.finish_reason == "length"
    assert engine.active == 0
    assert engine.stats["finished"] == len(prompts)


def test_seeded_sampling_is_the_same_batched(generator):
    prompts = [generator.prompt_ids(prompt=t) for t in TEXTS[:3]]
    params = [
        _params(generator, temperature=0.9, top_p=0.95, seed=s, max_tokens=10, stop_token_ids=[])
        for s in (1, 2, 3)
    ]
    expected = [
        generator.generate(prompt=p, params=q).token_ids
        for p, q in zip(prompts, params, strict=True)
    ]
    engine = BatchEngine(generator, max_batch=4)
    outputs = _run(
        engine,
        {0: [(prompts[0], params[0])], 1: [(prompts[1], params[1]), (prompts[2], params[2])]},
    )
    assert [[d.token_id for d in deltas] for deltas in outputs] == expected


def test_cancel_frees_the_slot(generator):
    engine = BatchEngine(generator, max_batch=2)
    params = _params(generator, temperature=0, max_tokens=50, stop_token_ids=[])
    seen: list = []
    request = engine.add(generator.prepare(prompt=TEXTS[0], params=params), seen.append)
    other: list = []
    engine.add(
        generator.prepare(prompt=TEXTS[2], params=params.replace(max_tokens=6)), other.append
    )
    for _ in range(3):
        engine.step()
    assert engine.active == 2
    engine.cancel(request)
    engine.step()
    assert engine.active == 1
    assert len(seen) == 4  # step 1 prefills and decodes; nothing was sent after the cancel
    while engine.step():
        pass
    assert engine.active == 0
    assert engine.stats == {**engine.stats, "cancelled": 1, "finished": 1}
    assert len(other) == 6


def test_context_limit(generator):
    engine = BatchEngine(generator, max_context=40)
    with pytest.raises(
        ContextLengthError,
        match="maximum context length is 40 tokens, but the prompt has 40 tokens",
    ):
        prepared = generator.prepare(prompt=list(range(100, 140)), params=_params(generator))
        engine.add(prepared, lambda _: None)
    with pytest.raises(QwenDeployError, match="prompt is empty"):
        engine.add(generator.prepare(prompt=[], params=_params(generator)), lambda _: None)
    # a prompt near the limit generates until the context is full, then stops with "length"
    out: list = []
    prompt = list(range(100, 135))
    params = _params(generator, temperature=0, max_tokens=100, stop_token_ids=[])
    engine.add(generator.prepare(prompt=prompt, params=params), out.append)
    while engine.step():
        pass
    assert len(out) == 5 and out[-1].finish_reason == "length"
    with pytest.raises(QwenDeployError, match="max_context"):
        BatchEngine(generator, max_context=generator.manifest.model.max_position_embeddings + 1)


def test_a_model_failure_ends_the_batch_and_the_engine_recovers(generator):
    engine = BatchEngine(generator, max_batch=2)
    params = _params(generator, temperature=0, max_tokens=6, stop_token_ids=[])
    prompt = generator.prompt_ids(prompt=TEXTS[2])
    forward = generator.backend.forward

    def failing(ids, mask, positions, cache, **options):
        if cache.length > len(prompt) + 1:  # the third decode step, after three tokens
            raise RuntimeError("device lost")
        return forward(ids, mask, positions, cache, **options)

    first: list = []
    generator.backend.forward = failing
    try:
        engine.add(engine.generator.prepare(prompt=prompt, params=params), first.append)
        while engine.step():
            pass
    finally:
        generator.backend.forward = forward
    assert len(first) == 4 and isinstance(first[-1], QwenDeployError)
    assert "the model failed on this batch (RuntimeError: device lost)" in str(first[-1])
    assert engine.active == 0 and engine.stats["failed"] == 1
    again = _run(engine, {0: [(prompt, params)]})[0]
    assert [d.token_id for d in again] == generator.generate(prompt=prompt, params=params).token_ids
    with pytest.raises(QwenDeployError, match=r"token ids \[999999\] are outside"):
        engine.add(engine.generator.prepare(prompt=[1, 999999], params=params), lambda _: None)


def test_a_failing_mixed_step_fails_its_rows_and_its_newcomer_and_the_engine_recovers(generator):
    """The forward that carries the running rows' decode and a newcomer's chunk fails: both get
    the error, and the next requests are served as usual."""
    if not generator.backend.capabilities.mixed_steps:
        pytest.skip("left-padded rows run no mixed steps")
    engine = BatchEngine(generator, max_batch=2)
    params = _params(generator, temperature=0, max_tokens=6, stop_token_ids=[])
    prompts = [generator.prompt_ids(prompt=t) for t in TEXTS[:2]]
    running: list = []
    engine.add(engine.generator.prepare(prompt=prompts[0], params=params), running.append)
    engine.step()  # the first request is decoding
    backend, mixed = generator.backend, generator.backend.forward_mixed

    def failing(*lanes):
        raise RuntimeError("device lost")

    newcomer: list = []
    backend.forward_mixed = failing
    try:
        engine.add(engine.generator.prepare(prompt=prompts[1], params=params), newcomer.append)
        while engine.step():
            pass
    finally:
        backend.forward_mixed = mixed
    for out in (running, newcomer):
        assert isinstance(out[-1], QwenDeployError)
        assert "the model failed on this batch (RuntimeError: device lost)" in str(out[-1])
    assert engine.active == 0 and engine.stats["failed"] == 2
    outputs = _run(engine, {0: [(prompts[0], params)], 1: [(prompts[1], params)]})
    assert engine.stats["mixed_steps"] > 0
    for prompt, deltas in zip(prompts, outputs, strict=True):
        expected = generator.generate(prompt=prompt, params=params).token_ids
        assert [d.token_id for d in deltas] == expected


def test_async_submit_on_the_worker_thread(generator):
    prompts = [generator.prompt_ids(prompt=t) for t in TEXTS[:4]]
    params = _params(generator, temperature=0, max_tokens=8, stop_token_ids=[])
    expected = [generator.generate(prompt=p, params=params).token_ids for p in prompts]
    engine = BatchEngine(generator, max_batch=3)
    engine.start()

    async def one(prompt: list[int]) -> list[int]:
        stream = await engine.submit(engine.generator.prepare(prompt=prompt, params=params))
        return [d.token_id async for d in stream]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        assert asyncio.run(main()) == expected
        assert engine.stats["steps"] < sum(len(e) for e in expected)  # decode steps were shared
    finally:
        engine.close()
    assert engine.active == 0


def test_decode_steps_keep_the_cache_on_the_backend(generator):
    """Between joins and leaves a decode step feeds the bound cache back (gqa: the same buffers,
    written in place) instead of moving the whole cache through host arrays."""
    engine = BatchEngine(generator, max_batch=2)
    params = _params(generator, temperature=0, max_tokens=6, stop_token_ids=[])
    for text in TEXTS[:2]:
        engine.add(generator.prepare(prompt=text, params=params), lambda _: None)
    engine.step()  # prefill + first decode
    cache = engine._batch.cache
    assert cache.values and not cache.arrays
    buffers = {name: value.data_ptr() for name, value in cache.values.items()}
    length = cache.length
    engine.step()
    assert engine._batch.cache.length == length + 1
    if generator.backend.in_place:
        assert engine._batch.cache is cache
        assert {name: v.data_ptr() for name, v in cache.values.items()} == buffers


def test_a_request_joins_a_running_one_without_a_rebuild(generator):
    """The first request's batch is rebuilt with room for max_batch rows as it starts decoding
    (no row decodes then), so a request that joins later copies only its own positions: the
    running cache's buffers stay (a rebuild there stalled the running stream a step)."""
    if not generator.backend.capabilities.row_slots:
        pytest.skip("this form's rows share one length: a join rebuilds the cache")
    engine = BatchEngine(generator, max_batch=4)
    params = _params(generator, temperature=0, max_tokens=30, stop_token_ids=[])
    engine.add(generator.prepare(prompt=TEXTS[0], params=params), lambda _: None)
    engine.step()
    buffers = engine._batch.cache.buffers
    assert next(iter(buffers.values())).shape[0] == 4
    engine.add(generator.prepare(prompt=TEXTS[1], params=params), lambda _: None)
    while len(engine._running) < 2:
        engine.step()
    assert engine._batch.cache.buffers is buffers


def test_speculative_requests_run_beside_the_batch_with_their_solo_tokens(generator):
    """A request with a drafter decodes on a batch of its own, a round per step, next to the
    batched rows; greedy and seeded output equal plain decoding, and its statistics add up."""
    prompts = [generator.prompt_ids(prompt=t) for t in TEXTS[:4]]
    params = [
        _params(generator, temperature=0, max_tokens=14, stop_token_ids=[]),
        _params(generator, temperature=0.9, seed=5, max_tokens=12, stop_token_ids=[]),
        _params(generator, temperature=0, max_tokens=10, stop_token_ids=[]),
        _params(generator, temperature=0.8, seed=9, max_tokens=9, stop_token_ids=[]),
    ]
    expected = [
        generator.generate(prompt=p, params=q) for p, q in zip(prompts, params, strict=True)
    ]
    # the drafts of request 0 are its own plain answer: every draft is right
    drafters = [
        PromptLookup(reference=expected[0].token_ids),
        PromptLookup(),
        None,
        None,
    ]
    engine = BatchEngine(generator, max_batch=3)
    outputs, queued = [], []
    for prompt, p, drafter in zip(prompts, params, drafters, strict=True):
        outputs.append([])
        request = generator.prepare(prompt=prompt, params=p)
        queued.append(engine.add(request, outputs[-1].append, drafter, draft_tokens=4))
    steps = 0
    while engine.step():
        steps += 1
        assert len(engine._running) + len(engine._speculating) <= 3  # one slot each
    for deltas, result in zip(outputs, expected, strict=True):
        assert [d.token_id for d in deltas] == result.token_ids
        assert deltas[-1].finish_reason == "length"
    right = queued[0].speculative
    assert right.accepted == right.drafted > 0
    # a forward gives the accepted drafts and one token more; the prefill gives the first
    for request in queued[:2]:
        stats = request.speculative
        assert (
            stats.tokens == 1 + stats.forwards + stats.accepted == len(request.state.completion_ids)
        )
    assert right.forwards <= -(-13 // 5)  # 13 tokens after the first, up to 5 per forward
    total = engine.speculative
    assert total.tokens == sum(len(d) for d in outputs[:2])
    assert engine.active == 0 and engine.stats["finished"] == 4


def test_a_failing_speculative_request_fails_alone(generator):
    class Broken:
        default_k = 4

        def propose(self, tokens, k):
            raise RuntimeError("drafter lost")

    params = _params(generator, temperature=0, max_tokens=6, stop_token_ids=[])
    prompt = generator.prompt_ids(prompt=TEXTS[2])
    engine = BatchEngine(generator, max_batch=2)
    broken, plain = [], []
    engine.add(generator.prepare(prompt=prompt, params=params), broken.append, Broken())
    engine.add(generator.prepare(prompt=prompt, params=params), plain.append)
    while engine.step():
        pass
    assert isinstance(broken[-1], QwenDeployError) and "drafter lost" in str(broken[-1])
    assert [d.token_id for d in plain] == generator.generate(prompt=prompt, params=params).token_ids
    assert engine.active == 0 and engine.stats["failed"] == 1


def _forwards(generator, run):
    """run()'s result and the (ids shape, cache length) of every forward it makes: each lane of
    a mixed step counts as one."""
    calls, backend = [], generator.backend
    forward, mixed = backend.forward, getattr(backend, "forward_mixed", None)

    def recording(ids, mask, positions, cache, **options):
        calls.append((ids.shape, cache.length))
        return forward(ids, mask, positions, cache, **options)

    def recording_mixed(*lanes):
        calls.extend((ids.shape, cache.length) for ids, _, _, cache in lanes)
        return mixed(*lanes)

    backend.forward, backend.forward_mixed = recording, recording_mixed
    try:
        return run(), calls
    finally:
        backend.forward, backend.forward_mixed = forward, mixed


def test_a_cached_prefix_is_not_prefilled_again_and_changes_nothing(generator):
    """A second turn that starts with the first turn's prompt prefills only what is new, and
    generates exactly what it generates without the cache (greedy and seeded)."""
    history = generator.prompt_ids(messages=[{"role": "user", "content": TEXTS[1]}])
    turn = [*history, *generator.prompt_ids(prompt=TEXTS[4])]
    greedy = _params(generator, temperature=0, max_tokens=8, stop_token_ids=[])
    seeded = _params(generator, temperature=0.9, seed=4, max_tokens=8, stop_token_ids=[])
    cold = BatchEngine(generator, prefill_chunk=16)
    expected = [_run(cold, {0: [(turn, p)]})[0] for p in (greedy, seeded)]
    warm = BatchEngine(generator, prefill_chunk=16, prefix_cache_bytes=2**24)
    _run(warm, {0: [(history, greedy)]})
    (outputs, calls) = _forwards(
        generator, lambda: [_run(warm, {0: [(turn, p)]})[0] for p in (greedy, seeded)]
    )
    for got, want in zip(outputs, expected, strict=True):
        assert [d.token_id for d in got] == [d.token_id for d in want]
    # the first turn reuses the history's whole blocks, the second all of the first's (at least
    # two tokens are always prefilled)
    reused = [len(history) // 16 * 16, (len(turn) - 2) // 16 * 16]
    fed = sum(tokens for (_, tokens), _ in calls if tokens > 1)
    assert fed == sum(len(turn) - n for n in reused)
    assert warm.prefix_cache.stats()["hit_rate"] == 2 / 3


def test_a_long_prompt_arrives_in_chunks_between_decode_steps(generator):
    """Running rows get a token at every step while a long prompt is prefilled, a chunk a step."""
    params = _params(generator, temperature=0, max_tokens=30, stop_token_ids=[])
    long_prompt = generator.prompt_ids(prompt=" ".join(TEXTS) * 2)
    engine = BatchEngine(generator, max_batch=4, prefill_chunk=16)
    streams: list[list] = [[], []]
    for text, out in zip(TEXTS[:2], streams, strict=True):
        engine.add(generator.prepare(prompt=text, params=params), out.append)
    while not all(streams):
        engine.step()
    long_out: list = []
    engine.add(generator.prepare(prompt=long_prompt, params=params), long_out.append)
    steps = 0
    while not long_out:
        before = [len(s) for s in streams]
        engine.step()
        steps += 1
        assert [len(s) for s in streams] == [n + 1 for n in before]
    assert steps == -(-len(long_prompt) // 16)  # one chunk of the long prompt per step


def test_echo_scores_the_prompt_in_the_prefill_that_starts_generation(generator):
    prompt = generator.prompt_ids(prompt=" ".join(TEXTS))
    params = _params(generator, temperature=0, max_tokens=3, stop_token_ids=[])
    engine = BatchEngine(generator, prefill_chunk=256)
    out: list = []
    queued, calls = _forwards(
        generator,
        lambda: (
            engine.add(
                generator.prepare(prompt=prompt, params=params), out.append, prompt_logprobs=3
            ),
            _run(engine, {}),
        )[0],
    )
    logits = Batch(generator.backend, 1).prefill([prompt], generator.pad_id, last_only=False)[0]
    expected = [token_logprob(logits[i - 1], prompt[i], 3) for i in range(1, len(prompt))]
    assert queued.prompt_logprobs[0] == TokenLogprob(prompt[0], None, [])
    assert queued.prompt_logprobs[1:] == expected
    assert sum(tokens for (_, tokens), _ in calls if tokens > 1) == len(prompt)  # one prefill
    assert [d.token_id for d in out] == generator.generate(prompt=prompt, params=params).token_ids


def test_the_kv_budget_makes_requests_wait_and_refuses_what_cannot_fit(generator):
    params = _params(generator, temperature=0, max_tokens=8, stop_token_ids=[])
    prompts = [generator.prompt_ids(prompt=t) for t in TEXTS[:2]]
    per_position = generator.backend.capabilities.kv_bytes_per_position
    longest = max(len(p) for p in prompts) + 8
    engine = BatchEngine(generator, kv_budget_bytes=longest * per_position)  # one row at a time
    outputs = [[], []]
    for prompt, out in zip(prompts, outputs, strict=True):
        engine.add(generator.prepare(prompt=prompt, params=params), out.append)
    while engine.step():
        assert len(engine._running) + len(engine._prefilling) <= 1
        assert not outputs[1] or outputs[0][-1].finish_reason  # the second waited its turn
    for prompt, out in zip(prompts, outputs, strict=True):
        assert [d.token_id for d in out] == generator.generate(
            prompt=prompt, params=params
        ).token_ids
    big = params.replace(max_tokens=longest)
    with pytest.raises(KVBudgetError, match=r"MiB of KV cache \(\d+ prompt tokens \+ max_tokens"):
        engine.add(generator.prepare(prompt=prompts[0], params=big), lambda _: None)


def test_batch_invariance_needs_rows_of_their_own_length(generator):
    """gqa artifacts keep each row's length by default; a left-padded form cannot be batch
    invariant, and asking for it says so with the fix."""
    if generator.manifest.attention == "gqa":
        assert BatchEngine(generator).own_lengths
        assert BatchEngine(generator, batch_invariant=True).own_lengths
        assert not BatchEngine(generator, batch_invariant=False).own_lengths
        return
    assert not BatchEngine(generator).own_lengths
    with pytest.raises(QwenDeployError, match="export CHECKPOINT --attention gqa` on onnxrunt"):
        BatchEngine(generator, batch_invariant=True)


def test_batch_invariance_refuses_fp16_whose_rows_round_beside_others(artifact):
    """An fp16 artifact's rows keep their own lengths, but a row's logits move (~2e-7 on the
    tiny model) when other rows share its step: invariance is refused with the fix."""
    generator = Generator(artifact(attention="gqa", precision="fp16"))
    assert BatchEngine(generator).own_lengths
    with pytest.raises(QwenDeployError, match="fp16 artifact's matrix products round a row"):
        BatchEngine(generator, batch_invariant=True)
