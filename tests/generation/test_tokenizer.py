"""Tokenizer and streaming detokenization against transformers' tokenizer on the real Qwen files."""

from __future__ import annotations

import json
import random

import pytest

from qwen_deploy.checkpoint.random_model import qwen_tokenizer_dir
from qwen_deploy.errors import ArtifactError
from qwen_deploy.generation.tokenizer import IncrementalDecoder, Tokenizer, TooManyTokens

transformers = pytest.importorskip("transformers", reason="transformers is the reference tokenizer")

TEXTS = {
    "english": "The convertible bond's coupon is 2.5%; conversion price $41.30.\n\n  Indented.",
    "chinese": "可转换债券是一种可以在特定条件下转换为普通股的债券。龘𠀀鑫",
    "emoji": "Markets 📈📉 today 👍🏽 🧑‍🚀 ℹ️ 👨‍👩‍👧‍👦!",
    "mixed_special": "<|im_start|>user\n你好 😀<|im_end|>\n<|im_start|>assistant\n"
    "<think>\n龘\n</think>",
}


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return Tokenizer.from_artifact(qwen_tokenizer_dir())


@pytest.fixture(scope="module")
def hf_qwen():
    return transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_token_ids(tokenizer: Tokenizer, data: bytes) -> list[int]:
    """One token per byte: the worst case for streaming (every multi-byte char split)."""
    table = _bytes_to_unicode()
    return [tokenizer.token_to_id(table[b]) for b in data]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encode_decode_match_transformers(qwen, hf_qwen, name):
    text = TEXTS[name]
    ids = qwen.encode(text)
    assert ids == hf_qwen.encode(text, add_special_tokens=False)
    assert qwen.decode(ids) == text == hf_qwen.decode(ids)
    assert qwen.decode(ids, skip_special_tokens=True) == hf_qwen.decode(
        ids, skip_special_tokens=True
    )


def test_special_tokens_as_the_checkpoint_defines_them(qwen, hf_qwen):
    assert qwen.special_tokens == hf_qwen.special_tokens_map
    assert qwen.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    for token in ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<think>", "</tool_call>"):
        assert qwen.token_to_id(token) == hf_qwen.convert_tokens_to_ids(token)
    assert qwen.token_to_id("<|im_end|>") == 151645
    assert qwen.token_to_id("no such token") is None
    # special=True tokens are skipped, <think> (special=False in the checkpoint) is kept
    ids = qwen.encode("<|im_start|>a<think>b<|im_end|>")
    assert qwen.decode(ids, skip_special_tokens=True) == "a<think>b"


def test_deepseek_r1_special_tokens_from_addedtoken_dicts(r1_tokenizer_dir):
    ours = Tokenizer.from_artifact(r1_tokenizer_dir)
    hf = transformers.AutoTokenizer.from_pretrained(r1_tokenizer_dir)
    assert ours.special_tokens == hf.special_tokens_map
    assert ours.special_tokens["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert ours.token_to_id(ours.special_tokens["bos_token"]) == 151646
    assert ours.token_to_id(ours.special_tokens["eos_token"]) == 151643
    text = "<｜begin▁of▁sentence｜><｜User｜>债券 😀<｜Assistant｜><think>\n"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == hf.decode(
        hf.encode(text, add_special_tokens=False), skip_special_tokens=True
    )


def test_tokens_declared_only_in_config_are_added_like_transformers(tmp_path):
    """A config naming a pad token that tokenizer.json lacks: transformers adds it, so do we."""
    (tmp_path / "tokenizer.json").symlink_to(qwen_tokenizer_dir() / "tokenizer.json")
    config = json.loads((qwen_tokenizer_dir() / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|my_pad|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_artifact(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.special_tokens["pad_token"] == "<|my_pad|>"
    assert ours.token_to_id("<|my_pad|>") == hf.convert_tokens_to_ids("<|my_pad|>") == 151669
    text = "a<|my_pad|><|my_pad|>b"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == "ab"


def test_missing_or_broken_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match=r"has no tokenizer\.json.*re-export"):
        Tokenizer.from_artifact(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid tokenizer file"):
        Tokenizer.from_artifact(tmp_path)


def _stream(tokenizer: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("name", ["chinese", "emoji", "mixed_special"])
def test_incremental_decoding_token_by_token(qwen, name):
    ids = qwen.encode(TEXTS[name])
    # the text really splits characters across tokens, so holding back is exercised
    assert any("\ufffd" in qwen.decode([i]) for i in ids)
    deltas = _stream(qwen, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == qwen.decode(ids) == TEXTS[name]
    skipped = _stream(qwen, ids, skip=True)
    assert "".join(skipped) == qwen.decode(ids, skip_special_tokens=True)


def test_incremental_decoding_one_byte_per_token_emits_whole_characters(qwen):
    text = "债券😀a👨‍👩‍👧é"
    deltas = _stream(qwen, _byte_token_ids(qwen, text.encode()))
    # each character appears at the push of its last byte, never earlier, never in pieces
    expected = []
    for char in text:
        expected += [""] * (len(char.encode()) - 1) + [char]
    assert deltas == [*expected, ""]


def test_incremental_decoding_of_random_ids_concatenates_to_decode(qwen):
    """Arbitrary token sequences (invalid UTF-8 included) still add up to the full decode."""
    rng = random.Random(0)
    pool = [*range(0, 256), *range(100_000, 151_643), *range(151_643, 151_669)]
    for _ in range(20):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        for skip in (False, True):
            deltas = _stream(qwen, ids, skip)
            assert "".join(deltas) == qwen.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("unit", ["word ", "数据", "x" * 40 + "\n"])
def test_a_text_far_past_the_limit_is_refused_from_a_head_with_a_lower_bound(qwen, unit):
    limit = 200
    text = unit * 20_000  # hundreds of thousands of characters, thousands of tokens
    whole = len(qwen.encode(text))
    with pytest.raises(TooManyTokens) as refused:
        qwen.encode(text, limit)
    assert refused.value.at_least
    assert limit <= refused.value.count <= whole
    # a long text under the limit is not refused by its head: spaces compress to few tokens
    sparse = " " * 5_000 + "end"
    assert len(sparse) > 4 * limit
    assert qwen.encode(sparse, limit) == qwen.encode(sparse)
