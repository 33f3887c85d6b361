"""Reasoning split: whole outputs, streamed in any chunking, with the real tokenizer/templates."""

from __future__ import annotations

import json
import random

import pytest

from qwen_deploy.checkpoint.random_model import qwen_tokenizer_dir
from qwen_deploy.generation.chat_template import ChatTemplate
from qwen_deploy.generation.reasoning import ReasoningParser, prompt_opens_think, split_reasoning
from qwen_deploy.generation.tokenizer import IncrementalDecoder, Tokenizer, load_special_tokens

# (output text, started) -> (reasoning_content, content)
SPLITS = [
    (
        ("<think>\nCoupon 5%.\n</think>\n\nThe yield is 5%.", False),
        ("Coupon 5%.", "The yield is 5%."),
    ),
    (("Coupon 5%.\n</think>\n\nThe yield is 5%.", True), ("Coupon 5%.", "The yield is 5%.")),
    # R1 distills with an older template emit the opening tag themselves: it is consumed
    (("<think>\nCoupon 5%.\n</think>\n\nYield.", True), ("Coupon 5%.", "Yield.")),
    (("  \n<think>a\n\nb</think>c", False), ("a\n\nb", "c")),
    (("No thinking here.", False), (None, "No thinking here.")),
    (
        ("\n\nLeading newlines kept without a block.", False),
        (None, "\n\nLeading newlines kept without a block."),
    ),
    # only a block at the start counts; later tags are answer text
    (
        ("Answer with <think> inside</think> text", False),
        (None, "Answer with <think> inside</think> text"),
    ),
    (("<think>r</think>a <think>x</think>", False), ("r", "a <think>x</think>")),
    # unclosed (cut by max_tokens): everything is reasoning
    (("<think>\nstill thinking\n\n", False), ("still thinking", "")),
    (("still thinking </thi", True), ("still thinking </thi", "")),
    (("</think>\n\nImmediate answer.", True), ("", "Immediate answer.")),
    (("<thinking>is not a tag", False), (None, "<thinking>is not a tag")),
    (("<thi", False), (None, "<thi")),
    (("", True), ("", "")),
    (("", False), (None, "")),
    (("思考：可转债。\n</think>\n\n答案 😀", True), ("思考：可转债。", "答案 😀")),
]


@pytest.mark.parametrize(("args", "expected"), SPLITS)
def test_split_reasoning(args, expected):
    assert split_reasoning(*args) == expected


def _streamed(chunks: list[str], started: bool) -> tuple[str, str]:
    parser = ReasoningParser(started)
    parts = [parser.push(c) for c in chunks] + [parser.flush()]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


@pytest.mark.parametrize(("args", "expected"), SPLITS)
def test_streaming_in_any_chunking_equals_the_whole_split(args, expected):
    text, started = args
    want = (expected[0] or "", expected[1])
    assert _streamed(list(text), started) == want  # one character at a time
    for cut in range(len(text) + 1):  # every two-piece split, tags cut anywhere
        assert _streamed([text[:cut], text[cut:]], started) == want
    rng = random.Random(len(text))
    for _ in range(20):
        chunks, i = [], 0
        while i < len(text):
            n = rng.randint(1, 4)
            chunks.append(text[i : i + n])
            i += n
        assert _streamed(chunks, started) == want


def test_split_tags_are_held_back_not_leaked():
    parser = ReasoningParser()
    assert parser.push("<th") == ("", "")
    assert parser.push("ink>\nabc\n</th") == ("abc", "")
    assert parser.push("ink>\n\nAns") == ("", "Ans")
    assert parser.push("wer") == ("", "wer")
    assert parser.flush() == ("", "")


@pytest.mark.parametrize(
    ("prompt", "opens"),
    [
        ("<｜User｜>hi<｜Assistant｜><think>\n", True),
        ("<|im_start|>assistant\n<think>", True),
        ("<|im_start|>assistant\n", False),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
    ],
)
def test_prompt_opens_think(prompt, opens):
    assert prompt_opens_think(prompt) is opens


def test_prompt_opens_think_on_rendered_templates(r1_tokenizer_dir):
    messages = [{"role": "user", "content": "What is a convertible bond?"}]
    r1_config = json.loads((r1_tokenizer_dir / "tokenizer_config.json").read_text())
    r1 = ChatTemplate(r1_config["chat_template"], load_special_tokens(r1_tokenizer_dir))
    assert prompt_opens_think(r1.render(messages))
    assert not prompt_opens_think(r1.render(messages, add_generation_prompt=False))
    qwen_config = json.loads((qwen_tokenizer_dir() / "tokenizer_config.json").read_text())
    qwen = ChatTemplate(qwen_config["chat_template"], load_special_tokens(qwen_tokenizer_dir()))
    assert not prompt_opens_think(qwen.render(messages))
    assert not prompt_opens_think(qwen.render(messages, enable_thinking=False))


def test_token_stream_through_decoder_and_parser():
    """Tokens -> IncrementalDecoder -> ReasoningParser, with <think> as single added tokens and
    Chinese/emoji split over byte-level tokens, gives the same split as the whole text."""
    tokenizer = Tokenizer.from_artifact(qwen_tokenizer_dir())
    text = "<think>\n龘的笔画很多🧑‍🚀。\n</think>\n\n答案：龘 👨‍👩‍👧"
    ids = tokenizer.encode(text)
    assert tokenizer.token_to_id("<think>") in ids and tokenizer.token_to_id("</think>") in ids
    decoder, parser = IncrementalDecoder(tokenizer), ReasoningParser()
    reasoning = content = ""
    for token in ids:
        r, c = parser.push(decoder.push(token))
        assert "\ufffd" not in r + c
        reasoning, content = reasoning + r, content + c
    r, c = parser.push(decoder.flush())
    r2, c2 = parser.flush()
    assert (reasoning + r + r2, content + c + c2) == split_reasoning(text)
    assert split_reasoning(text) == ("龘的笔画很多🧑‍🚀。", "答案：龘 👨‍👩‍👧")


def test_split_then_render_gives_the_same_prompt_as_the_raw_output():
    """The Qwen template renders (reasoning_content, content) as it renders the raw output, so a
    client sending our split back gets the same prompt."""
    config = json.loads((qwen_tokenizer_dir() / "tokenizer_config.json").read_text())
    template = ChatTemplate(config["chat_template"], load_special_tokens(qwen_tokenizer_dir()))
    raw = "<think>\nCheck the coupon.\n\n</think>\n\nIt pays 5%."
    reasoning, content = split_reasoning(raw)
    user = {"role": "user", "content": "Coupon?"}
    as_raw = template.render(
        [user, {"role": "assistant", "content": raw}], add_generation_prompt=False
    )
    as_split = template.render(
        [user, {"role": "assistant", "content": content, "reasoning_content": reasoning}],
        add_generation_prompt=False,
    )
    assert as_split == as_raw
