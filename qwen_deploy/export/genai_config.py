"""genai_config.json: what onnxruntime-genai reads to run an artifact as it is.

Written next to every ONNX artifact (export, quantize), so `og.Model(artifact)` loads it with no
conversion: input and output names from the manifest, the model's numbers, its special ids and
generation defaults. past_present_share_buffer is false: the graph returns present = past + new
(a concat cache), it does not update a shared buffer in place for genai's bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    past_name,
    present_name,
)
from ..manifest import Manifest

FILE = "genai_config.json"


def _given(value: float | None, default: float) -> float:
    """A generation default, else onnxruntime-genai's own."""
    return default if value is None else value


def genai_config(manifest: Manifest) -> dict:
    spec, gen = manifest.model, manifest.generation
    sampled = bool(gen.do_sample)
    return {
        "model": {
            "type": "qwen2",
            "bos_token_id": manifest.bos_token_id,
            "eos_token_id": manifest.eos_token_ids,
            "pad_token_id": manifest.pad_id,
            "context_length": spec.max_position_embeddings,
            "vocab_size": spec.vocab_size,
            "decoder": {
                "filename": manifest.model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "num_attention_heads": spec.num_heads,
                "num_key_value_heads": spec.num_kv_heads,
                "num_hidden_layers": spec.num_layers,
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": past_name("%d", "key"),
                    "past_value_names": past_name("%d", "value"),
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": present_name("%d", "key"),
                    "present_value_names": present_name("%d", "value"),
                },
            },
        },
        "search": {
            "do_sample": sampled,
            "temperature": _given(gen.temperature, 1.0) if sampled else 1.0,
            "top_k": _given(gen.top_k, 50) if sampled else 1,
            "top_p": _given(gen.top_p, 1.0) if sampled else 1.0,
            "repetition_penalty": _given(gen.repetition_penalty, 1.0),
            "max_length": spec.max_position_embeddings,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
        },
    }


def write_genai_config(manifest: Manifest, folder: Path) -> None:
    (Path(folder) / FILE).write_text(json.dumps(genai_config(manifest), indent=2) + "\n")
