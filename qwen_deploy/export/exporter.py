"""Drive one export: validate, stream weights into external data, write graph and manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from tqdm import tqdm

from ..artifact import check_output, copy_side_files, staged_output
from ..checkpoint.huggingface import Checkpoint, ModelSpec
from ..contract import BATCH, DATA_FILE, LOGITS_TO_KEEP, MODEL_FILE, PAST, past_name, present_name
from ..errors import QwenDeployError
from ..manifest import (
    ATTENTION_FORMS,
    PRECISIONS,
    Manifest,
    TensorSpec,
    producer_record,
)
from ..records import OWN_LENGTH, Generation, KVCache
from .genai_config import write_genai_config
from .graph import OPSET, DecoderGraph, graph_io
from .weights import ExternalData

DTYPES = {"fp32": np.float32, "fp16": np.float16}
QWEN2_GENERATION_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.7,
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.05,
}


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def generation_defaults(
    ckpt: Checkpoint,
) -> tuple[Generation, list[int], int | None, int | None]:
    """Sampling defaults, EOS ids, pad id and bos id from generation_config.json and config.json.

    Without a generation_config.json the Qwen2 family's published defaults apply. The record
    holds only the keys the file sets (the manifest writes those alone).
    """
    gen = ckpt.generation_config
    keys = (
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "max_new_tokens",
    )
    defaults = {k: gen[k] for k in keys if k in gen} if gen else dict(QWEN2_GENERATION_DEFAULTS)
    eos = _token_ids(gen.get("eos_token_id")) or _token_ids(ckpt.config.get("eos_token_id"))
    pad = gen.get("pad_token_id", ckpt.config.get("pad_token_id"))
    bos = gen.get("bos_token_id", ckpt.config.get("bos_token_id"))
    return Generation.from_dict(defaults), eos, (pad[0] if isinstance(pad, list) else pad), bos


def _tensor_specs(spec: ModelSpec, dtype) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs, outputs = graph_io(spec, dtype)
    name = {v: k.lower() for k, v in TensorProto.DataType.items()}
    return (
        [TensorSpec(n, name[t], s) for n, t, s in inputs],
        [TensorSpec(n, name[t], s) for n, t, s in outputs],
    )


def build_manifest(
    ckpt: Checkpoint,
    precision: str,
    attention: str,
    data_files: list[str],
    tokenizer_files: list[str],
) -> Manifest:
    dtype = DTYPES[precision]
    inputs, outputs = _tensor_specs(ckpt.spec, dtype)
    generation, eos, pad, bos = generation_defaults(ckpt)
    return Manifest(
        model=ckpt.spec,
        precision=precision,
        attention=attention,
        opset=OPSET,
        model_file=MODEL_FILE,
        data_files=data_files,
        inputs=inputs,
        outputs=outputs,
        optional_inputs=[{"name": LOGITS_TO_KEEP, "dtype": "int64", "shape": [], "default": 0}],
        source={
            "path": str(ckpt.path.resolve()),
            "fingerprint": ckpt.fingerprint(),
            "dtype": ckpt.source_dtype,
            "architecture": "Qwen2ForCausalLM",
        },
        eos_token_ids=eos,
        pad_token_id=pad,
        bos_token_id=bos,
        generation=generation,
        chat_template=ckpt.chat_template,
        tokenizer_files=tokenizer_files,
        kv_cache=KVCache(
            layout="BNSH",
            shape=[BATCH, ckpt.spec.num_kv_heads, PAST, ckpt.spec.head_dim],
            dtype=precision,
            past=past_name("{layer}", "{key|value}"),
            present=present_name("{layer}", "{key|value}"),
            update="concat",
            rows=OWN_LENGTH if attention == "gqa" else None,
        ),
        producer=producer_record(),
    )


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    precision: str = "fp32",
    attention: str = "onnx",
    force: bool = False,
    progress: bool = True,
    on_layer: Callable[[str], None] | None = None,
) -> Manifest:
    """Export `source` (a Hugging Face Qwen2 folder) to the artifact folder `out`.

    The folder appears only when everything is written; a failure leaves nothing behind.
    `on_layer` is called with each weight group's name as it streams (tests use it to interrupt).
    """
    if precision not in PRECISIONS:
        raise QwenDeployError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    if attention not in ATTENTION_FORMS:
        raise QwenDeployError(
            f"attention {attention!r} is not one of {', '.join(ATTENTION_FORMS)}."
        )
    out = Path(out)
    check_output(out, force, [source])
    ckpt = Checkpoint(source)
    dtype = np.dtype(DTYPES[precision])
    bar = tqdm(total=ckpt.spec.num_layers + 2, desc="export", unit="group", disable=not progress)

    def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)
        if on_layer:
            on_layer(name)

    with staged_output(out, force, [source]) as tmp:
        data = ExternalData(tmp, DATA_FILE)
        try:

            def weight(onnx_name: str, ckpt_name: str, transpose: bool) -> TensorProto:
                array = ckpt.tensor(ckpt_name)
                if transpose:
                    return data.write_transposed(onnx_name, array, dtype)
                return data.write(onnx_name, array, dtype)

            model = DecoderGraph(ckpt.spec, dtype, attention, weight).build(step)
        finally:
            data.close()
            bar.close()
        onnx.save_model(model, tmp / MODEL_FILE)
        copied = [file.name for file in ckpt.tokenizer_files()]
        copy_side_files(ckpt.path, tmp, copied)
        manifest = build_manifest(ckpt, precision, attention, [DATA_FILE], copied)
        write_genai_config(manifest, tmp)
        manifest.save(tmp)  # last: it records every file's size and hash
    return manifest
