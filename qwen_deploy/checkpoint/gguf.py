"""Convert a llama.cpp GGUF file of a Qwen2 model into a Hugging Face checkpoint folder.

Every qwen-deploy stage starts from a Hugging Face folder, and many Qwen2 models circulate as GGUF
only. The `gguf` package (llama.cpp's own reader) parses the file and dequantizes each tensor, so
the folder holds the very model the GGUF holds, its quantization error included: config.json from
the metadata, safetensors weights, tokenizer.json rebuilt from the vocabulary and merges, and
tokenizer_config.json / generation_config.json from the special-token metadata.
Needs the `gguf` extra (gguf, safetensors); no torch.
"""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tqdm import tqdm

from .. import memory
from ..artifact import check_output, staged_output
from ..errors import GGUFError, QwenDeployError
from .huggingface import Checkpoint, ModelSpec, expected_shapes, spec_from_config

ARCHITECTURE = "qwen2"
DTYPES = {"float32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
TORCH_DTYPE_NAMES = {"float32": "float32", "bf16": "bfloat16"}
# llama.cpp's tokenizer.ggml.pre names for vocabularies that split text as Qwen2 does
QWEN2_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")
# Qwen2's text split, exactly as its tokenizer.json spells it
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# gguf.TokenType values (fixed by the GGUF spec)
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5
# llama.cpp also ends generation at these when the vocabulary has them (its EOG detection)
END_OF_GENERATION = ("<|endoftext|>", "<|im_end|>")
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {  # blk.N.<key> -> model.layers.N.<value>
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def convert_gguf(
    gguf_path: str | Path,
    out: str | Path,
    dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
    max_memory: float | None = None,
) -> Path:
    """Write the Qwen2 model in `gguf_path` to the Hugging Face checkpoint folder `out`.

    Everything that can be checked from the metadata is checked before a tensor is dequantized,
    the memory the conversion holds (`max_memory` GB, default: what is available) included;
    the folder appears only when complete and accepted by the exporter's checkpoint validation.
    """
    if dtype not in DTYPES:
        raise QwenDeployError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    out = Path(out)
    check_output(out, force, [gguf_path])
    _require_packages()
    source = GGUFFile(Path(gguf_path))
    config = model_config(source, dtype)
    _check_memory(Path(gguf_path), spec_from_config(config), dtype, max_memory)
    weights = hf_tensors(source, spec_from_config(config))
    side_files = {
        "config.json": config,
        "tokenizer_config.json": tokenizer_config(source),
        "generation_config.json": generation_config(source),
    }
    tokenizer = build_tokenizer(source)
    del source  # gguf parses the vocabulary into ~1M small arrays (0.5 GB): gone before the weights
    with staged_output(out, force, [gguf_path]) as tmp:
        for name, data in side_files.items():
            _write_json(tmp / name, data)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_weights(weights, tmp / "model.safetensors", DTYPES[dtype], progress)
        Checkpoint(tmp)
    return out


def _check_memory(path: Path, spec: ModelSpec, dtype: str, max_memory: float | None) -> None:
    """The conversion holds the dequantized model at once (safetensors' writer takes the whole
    dict) beside the GGUF's mapped pages; the parsed vocabulary is released before."""
    params = sum(memory.parameters(spec).values())

    def need(name: str) -> memory.Need:
        return memory.process() + memory.Need(
            {
                "GGUF file": path.stat().st_size,
                f"{name} weights": params * DTYPES[name].itemsize,
            }
        )

    instead = [f"--dtype bf16 (about {memory.gb(need('bf16').total)})"] if dtype != "bf16" else []
    memory.require(
        "convert-gguf", need(dtype), max_memory, [*instead, "convert on a machine with more memory"]
    )


def _require_packages() -> None:
    """gguf and safetensors are the optional `gguf` extra: say how to get them."""
    for package in ("gguf", "safetensors"):
        if importlib.util.find_spec(package) is None:
            raise QwenDeployError(
                f"converting a GGUF file needs the `{package}` package: "
                "pip install 'qwen-deploy[gguf]'"
            )


class GGUFFile:
    """A GGUF file's key/value metadata and tensors, as gguf's GGUFReader reads them."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = path
        if not path.is_file():
            raise GGUFError(f"{path} does not exist or is not a file; pass the .gguf model file.")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise GGUFError(
                    f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a "
                    "llama.cpp .gguf model file."
                )
        try:
            reader = GGUFReader(path)
        except (ValueError, IndexError, KeyError) as e:
            raise GGUFError(
                f"{path} is not a readable GGUF file ({e}). A truncated or partial download "
                "reads like this: download it again. A file from a newer llama.cpp may need a "
                "newer reader: pip install -U gguf."
            ) from e
        self.fields = reader.fields
        self.tensors = {tensor.name: tensor for tensor in reader.tensors}
        self._values: dict[str, Any] = {}  # decoded once: the vocabulary is read several times
        self._check_model()

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.fields:
            return default
        if key not in self._values:
            self._values[key] = _value(self.fields[key])
        return self._values[key]

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise GGUFError(
                f"{self.path} lacks the metadata key '{key}', which llama.cpp's "
                "convert_hf_to_gguf.py writes for every Qwen2 model; the file is incomplete or "
                "was made by another tool. Use a GGUF made by convert_hf_to_gguf.py."
            )
        return self.get(key)

    def _check_model(self) -> None:
        arch = self.require("general.architecture")
        if arch != ARCHITECTURE:
            raise GGUFError(
                f"{self.path} holds a {arch!r} model; convert-gguf converts GGUF architecture "
                f"{ARCHITECTURE!r} (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen) only, the "
                "architecture qwen-deploy exports."
            )
        parts = self.get("split.count", 1)
        if parts > 1:
            raise GGUFError(
                f"{self.path} is one of {parts} parts of a split GGUF; merge them first: "
                f"llama-gguf-split --merge {self.path} merged.gguf"
            )
        scaling = self.get(f"{ARCHITECTURE}.rope.scaling.type", "none")
        if scaling != "none":
            raise GGUFError(
                f"{self.path} asks for {scaling!r} RoPE scaling, which qwen-deploy does not "
                "implement; use a GGUF of the model without RoPE scaling (its native context)."
            )


def _value(field: Any) -> Any:
    """One metadata value as Python, from the reader's parts (ReaderField.contents() is newer
    than the oldest gguf this supports)."""
    kind = field.types[0].name
    if kind == "ARRAY":
        item = field.types[-1].name
        return [_scalar(field.parts[i], item) for i in field.data]
    return _scalar(field.parts[field.data[0]], kind)


def _scalar(part: np.ndarray, kind: str) -> Any:
    if kind == "STRING":
        return bytes(part).decode("utf-8")
    if kind == "FLOAT32":  # the float32's shortest decimal: 1e-06, not 9.999999974752427e-07
        return float(str(part[0]))
    return part[0].item()


def model_config(source: GGUFFile, dtype: str) -> dict:
    """config.json for Qwen2ForCausalLM from the metadata llama.cpp reads, with its defaults.

    Qwen2 always has q/k/v biases (transformers' Qwen2 has no switch for them); the vocabulary
    size is the embedding's rows, which may exceed the token count (Qwen2.5: 151936 vs 151665).
    """
    embedding = source.tensors.get("token_embd.weight")
    if embedding is None:
        raise GGUFError(f"{source.path} has no token_embd.weight tensor; the file is incomplete.")

    def key(name: str) -> str:
        return f"{ARCHITECTURE}.{name}"

    heads = source.require(key("attention.head_count"))
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": int(embedding.shape[1]),  # GGUF lists dims innermost first: [hidden, vocab]
        "hidden_size": source.require(key("embedding_length")),
        "intermediate_size": source.require(key("feed_forward_length")),
        "num_hidden_layers": source.require(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": source.get(key("attention.head_count_kv"), heads),
        "hidden_act": "silu",
        "rms_norm_eps": source.require(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": source.get(key("rope.freq_base"), 10000.0),
        "max_position_embeddings": source.require(key("context_length")),
        "use_sliding_window": False,
        "tie_word_embeddings": "output.weight" not in source.tensors,
        "bos_token_id": source.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": source.require("tokenizer.ggml.eos_token_id"),
        "dtype": TORCH_DTYPE_NAMES[dtype],
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],  # the transformers 4 spelling
    }


def tensor_names(num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name for a Qwen2 model of `num_layers` layers."""
    names = dict(GLOBAL_TENSORS)
    for i in range(num_layers):
        names.update({f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in LAYER_TENSORS.items()})
    return names


def hf_tensors(source: GGUFFile, spec: ModelSpec) -> dict[str, Any]:
    """The GGUF's tensors under their Hugging Face names, each with the shape the config implies.

    No q/k permutation: llama.cpp runs Qwen2 with NeoX RoPE and stores q/k as Hugging Face does
    (only its llama-architecture converter permutes them).
    """
    names = tensor_names(spec.num_layers)
    unknown = sorted(set(source.tensors) - set(names))
    if unknown:
        raise GGUFError(
            f"{source.path} has tensors a {spec.num_layers}-layer Qwen2 model does not: "
            f"{', '.join(unknown[:5])}; the file is not a plain Qwen2 GGUF."
        )
    shapes = expected_shapes(spec)
    tensors = {}
    for gguf_name, hf_name in names.items():
        if hf_name not in shapes:  # lm_head of a tied model
            continue
        tensor = source.tensors.get(gguf_name)
        if tensor is None:
            raise GGUFError(f"{source.path} lacks tensor {gguf_name}; the file is incomplete.")
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if shape != shapes[hf_name]:
            raise GGUFError(
                f"{source.path}: tensor {gguf_name} has shape {list(shape)} but the metadata "
                f"implies {list(shapes[hf_name])}; the file is inconsistent."
            )
        tensors[hf_name] = tensor
    return tensors


def _write_weights(tensors: dict[str, Any], file: Path, dtype: np.dtype, progress: bool) -> None:
    """Dequantize every tensor into one safetensors file.

    safetensors' numpy API writes a whole dict at once, so the dequantized model is held in memory
    (0.5B at float32: 2.5 GB; bf16 halves it): one tensor at a time would need a writer of our own.
    """
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    arrays = {}
    bar = tqdm(tensors.items(), desc="dequantize", unit="tensor", disable=not progress)
    for name, tensor in bar:
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(
                f"tensor {tensor.name} is of type {tensor.tensor_type.name}, which gguf "
                f"{importlib_metadata.version('gguf')} cannot dequantize; upgrade it (pip install "
                "-U gguf) or re-quantize the model to a type it reads (e.g. Q8_0) with "
                "llama-quantize."
            ) from e
        arrays[name] = array.astype(dtype, copy=False)  # [out, in], as Hugging Face stores it
    save_file(arrays, file, metadata={"format": "pt"})
    file.chmod(0o644)  # safetensors writes 0600; checkpoints are shared with servers and users


def _vocabulary(source: GGUFFile) -> list[tuple[str, int]]:
    """(text, gguf.TokenType value) of every token id."""
    tokens = source.require("tokenizer.ggml.tokens")
    kinds = source.require("tokenizer.ggml.token_type")
    if len(tokens) != len(kinds):
        raise GGUFError(
            f"{source.path} has {len(tokens)} tokens but {len(kinds)} token types; the file is "
            "corrupt."
        )
    return list(zip(tokens, kinds, strict=True))


def _added_tokens(source: GGUFFile) -> list[tuple[int, str, bool]]:
    """(id, text, special) of the tokens matched whole in text: control ones are special."""
    return [
        (i, token, kind == CONTROL)
        for i, (token, kind) in enumerate(_vocabulary(source))
        if kind in (CONTROL, USER_DEFINED)
    ]


def build_tokenizer(source: GGUFFile) -> Tokenizer:
    """The tokenizer.json tokenizer: byte-level BPE from the file's vocabulary and merges, with
    Qwen2's normalizer, text split and decoder, as the real Qwen2 tokenizer.json has them."""
    model = source.require("tokenizer.ggml.model")
    pre = source.get("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in QWEN2_PRE_TOKENIZERS:
        raise GGUFError(
            f"{source.path} has a {model!r} tokenizer with pre-tokenizer {pre!r}; convert-gguf "
            f"rebuilds Qwen2's byte-level BPE ('gpt2', pre {' or '.join(QWEN2_PRE_TOKENIZERS)})."
        )
    # Every token but llama.cpp's padding fillers goes in the BPE vocabulary under its id, so
    # added tokens keep their ids wherever they sit (tokenizers numbers new ones sequentially).
    vocab = {token: i for i, (token, kind) in enumerate(_vocabulary(source)) if kind != UNUSED}
    merges = source.require("tokenizer.ggml.merges")
    bpe = models.BPE(
        vocab,
        [tuple(merge.split(" ", 1)) for merge in merges],
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=False,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(
        [
            AddedToken(token, special=special, normalized=False)
            for _, token, special in _added_tokens(source)
        ]
    )
    return tokenizer


def tokenizer_config(source: GGUFFile) -> dict:
    """tokenizer_config.json shaped like Qwen2's own: no BOS unless the file says to add one."""
    tokens = source.require("tokenizer.ggml.tokens")
    add_bos = bool(source.get("tokenizer.ggml.add_bos_token", False))
    bos = source.get("tokenizer.ggml.bos_token_id")
    pad = source.get("tokenizer.ggml.padding_token_id")
    config = {
        "add_bos_token": add_bos,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, token, special in _added_tokens(source)
        },
        "bos_token": tokens[bos] if add_bos and bos is not None else None,
        "clean_up_tokenization_spaces": False,
        "eos_token": tokens[source.require("tokenizer.ggml.eos_token_id")],
        "errors": "replace",
        "model_max_length": source.require(f"{ARCHITECTURE}.context_length"),
        "pad_token": tokens[pad] if pad is not None else None,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    template = source.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def generation_config(source: GGUFFile) -> dict:
    """Special-token ids only. A GGUF carries no sampling values, so none are written and
    qwen-deploy (like transformers) decodes greedily unless a request asks otherwise; Qwen2.5's
    own file samples (temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05).
    EOS is a list: the file's EOS, then the end-of-generation tokens llama.cpp also stops at
    (Qwen2.5: [151645, 151643], as its own file has it)."""
    tokens = source.require("tokenizer.ggml.tokens")
    eos = source.require("tokenizer.ggml.eos_token_id")
    ends = sorted(i for i, token in enumerate(tokens) if token in END_OF_GENERATION and i != eos)
    config = {"eos_token_id": [eos, *ends]}
    for name, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        value = source.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[name] = value
    return config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
