"""Several choices in one request (a list of prompts, `n`), scoring a prompt without generating
(`echo` with `max_tokens: 0`) and top_logprobs with the chosen token, as OpenAI returns them."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.serving.server import MAX_CHOICES
from tests.serving import test_server
from tests.serving.test_server_logprobs import teacher_forced_logprobs

MODEL = "tiny-qwen"
PROMPTS = ["Bonds pay", "A convertible bond is", "Equity means"]
served = test_server.served  # the tiny model served with a batch of 8


def _idle(engine: BatchEngine) -> bool:
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    return engine.active == 0


def test_a_list_of_prompts_gets_one_choice_each_in_order(served):
    """Texts or token-id lists; each choice is what its prompt alone gets (greedy), usage
    adds them up; streamed, each chunk names its choice and the texts are the same."""
    prompts = [*PROMPTS, "Interest rates"]
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0}
    alone = [served.client.completions.create(**body, prompt=p) for p in prompts]
    batched = served.client.completions.create(**body, prompt=prompts)
    assert [c.index for c in batched.choices] == [0, 1, 2, 3]
    assert [c.text for c in batched.choices] == [a.choices[0].text for a in alone]
    assert batched.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batched.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone) == 20
    streamed = served.client.completions.create(
        **body, prompt=prompts, stream=True, stream_options={"include_usage": True}
    )
    texts, usage = [""] * 4, None
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    assert texts == [c.text for c in batched.choices]
    assert usage.completion_tokens == 20 and usage.prompt_tokens == batched.usage.prompt_tokens
    # token-id lists in a list
    token_lists = [served.generator.prompt_ids(prompt=p) for p in PROMPTS[:2]]
    by_ids = served.client.completions.create(**body, prompt=token_lists)
    assert [c.text for c in by_ids.choices] == [a.choices[0].text for a in alone[:2]]


def test_n_choices_per_prompt_in_openais_index_order(served):
    """n per prompt, prompt by prompt; a seeded choice j samples with seed + j: its first token
    (sampled from its own prefill, whatever its batch mates) is what n=1 with that seed gives,
    and the same request gives the same choices again."""
    body = {"model": MODEL, "max_tokens": 8, "temperature": 1.0, "seed": 11}
    two = served.client.completions.create(**body, prompt=PROMPTS[:2], n=3)
    assert [c.index for c in two.choices] == list(range(6))
    again = served.client.completions.create(**body, prompt=PROMPTS[:2], n=3)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]
    assert len({c.text for c in two.choices[:3]}) == 3  # different samples, not copies
    first = served.client.completions.create(**{**body, "max_tokens": 1}, prompt=PROMPTS[:2], n=3)
    for p, prompt in enumerate(PROMPTS[:2]):
        for j in range(3):
            one = served.client.completions.create(
                **{**body, "seed": 11 + j, "max_tokens": 1}, prompt=prompt
            )
            assert first.choices[3 * p + j].text == one.choices[0].text
    assert two.usage.prompt_tokens == sum(
        len(served.generator.prompt_ids(prompt=p)) for p in PROMPTS[:2]
    )  # a prompt counts once, whatever n
    assert two.usage.completion_tokens == 6 * 8
    chat = served.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=1.0,
        seed=5,
        n=2,
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content
    assert chat.usage.completion_tokens == 12
    assert _idle(served.engine)


def test_echo_with_max_tokens_0_scores_the_prompt_only(served, tiny_artifact):
    """What scoring clients send: the prompt and its logprobs, nothing generated, in one
    prefill; a prompt that fills the whole context can be scored."""
    prompt = "Convertible bonds pay coupons"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
    reply = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    ids = served.generator.prompt_ids(prompt=prompt)
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 0
    assert reply["usage"]["prompt_tokens"] == len(ids)
    logp = teacher_forced_logprobs(tiny_artifact, ids[:1], ids[1:])
    expected = [logp[i, token] for i, token in enumerate(ids[1:])]
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    # streamed: one chunk, the prompt and its logprobs, then [DONE]
    with httpx.stream(
        "POST", served.url + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) == 2
    chunk = json.loads(lines[0][6:])["choices"][0]
    assert chunk["text"] == prompt and chunk["finish_reason"] == "length"
    assert chunk["logprobs"]["token_logprobs"] == choice["logprobs"]["token_logprobs"]
    # a batch of prompts scored at once (lm-eval's loglikelihood requests)
    batch = httpx.post(
        served.url + "/v1/completions", json={**body, "prompt": PROMPTS}, timeout=60
    ).json()
    assert [c["text"] for c in batch["choices"]] == PROMPTS
    # the whole context: nothing is left to generate, and nothing needs to be
    full = [ids[i % len(ids)] for i in range(served.engine.max_context)]
    scored = httpx.post(
        served.url + "/v1/completions", json={**body, "prompt": full, "logprobs": 0}, timeout=300
    )
    assert scored.status_code == 200, scored.text
    assert len(scored.json()["choices"][0]["logprobs"]["token_logprobs"]) == len(full)
    assert _idle(served.engine)


def test_max_tokens_0_without_echo_is_refused(served):
    for path, body in [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ]:
        response = httpx.post(served.url + path, json={"model": MODEL, "max_tokens": 0, **body})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "max_tokens"
        assert error["message"].startswith("max_tokens=0 generates nothing: it is for scoring")


def test_top_logprobs_always_hold_the_chosen_token(served, tiny_artifact):
    """logprobs k: the k best and the chosen token when it is not among them (k + 1 at most);
    logprobs 0: the chosen token alone. Sampled at a high temperature, the chosen token is
    often not the best."""
    prompt = "Bonds pay"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 5.0, "seed": 3}
    one = httpx.post(served.url + "/v1/completions", json={**body, "logprobs": 1}).json()
    zero = httpx.post(served.url + "/v1/completions", json={**body, "logprobs": 0}).json()
    lp, lp0 = one["choices"][0]["logprobs"], zero["choices"][0]["logprobs"]
    assert lp["tokens"] == lp0["tokens"]
    assert lp0["top_logprobs"] == [
        {t: v} for t, v in zip(lp0["tokens"], lp0["token_logprobs"], strict=True)
    ]
    ids = served.generator.prompt_ids(prompt=prompt)
    chat = served.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=12,
        temperature=5.0,
        seed=3,
        logprobs=True,
        top_logprobs=1,
    )
    entries = chat.choices[0].logprobs.content
    not_best = 0
    for entry in entries:
        listed = [bytes(t.bytes) for t in entry.top_logprobs]
        assert bytes(entry.bytes) in listed
        assert len(listed) == (1 if entry.top_logprobs[0].logprob == entry.logprob else 2)
        not_best += len(listed) == 2
    for top, text, value in zip(
        lp["top_logprobs"], lp["tokens"], lp["token_logprobs"], strict=True
    ):
        assert top[text] == value and len(top) <= 2
    assert not_best >= 3, "the test needs sampled tokens that are not the most likely"
    # the values are the model's: the first token's best alternative is the row's maximum
    logp = teacher_forced_logprobs(tiny_artifact, ids, [0])  # the row after the prompt
    assert max(lp["top_logprobs"][0].values()) == pytest.approx(float(np.max(logp[0])), abs=1e-5)


def test_one_bad_prompt_refuses_the_request_and_leaves_nothing_queued(served):
    prompts = ["fine", "bond " * 5000, "fine too"]
    response = httpx.post(
        served.url + "/v1/completions",
        json={"model": MODEL, "prompt": prompts, "max_tokens": 50},
        timeout=60,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt.1" and error["code"] == "context_length_exceeded"
    assert _idle(served.engine)
    too_many = {"model": MODEL, "prompt": ["a"] * 8, "n": MAX_CHOICES // 8 + 1, "max_tokens": 1}
    response = httpx.post(served.url + "/v1/completions", json=too_many)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(
        f"this request asks for {8 * (MAX_CHOICES // 8 + 1)} choices (8 prompts x n="
    )
