"""A readable table of an artifact's manifest."""

from __future__ import annotations

from pathlib import Path

from .manifest import Manifest
from .records import Record


def _size(folder: Path, files: list[str]) -> str:
    total = sum((folder / f).stat().st_size for f in files if (folder / f).is_file())
    return f"{total / 2**20:,.1f} MiB"


def _fields(record: Record) -> str:
    """key=value of every key the manifest records, as written."""
    return ", ".join(f"{k}={v}" for k, v in record.to_dict().items())


def manifest_table(manifest: Manifest, folder: str | Path) -> str:
    folder = Path(folder)
    m = manifest.model
    rows = [
        ("artifact", str(folder)),
        ("source", f"{manifest.source.get('path')} ({manifest.source.get('dtype')})"),
        ("precision", manifest.precision),
        ("quantization", manifest.quantization_mode or "none"),
        ("attention", manifest.attention),
        ("opset", str(manifest.opset)),
        (
            "model file",
            f"{manifest.model_file} + {', '.join(manifest.data_files) or '-'} "
            f"({_size(folder, [manifest.model_file, *manifest.data_files])})",
        ),
        ("layers", str(m.num_layers)),
        ("hidden / intermediate", f"{m.hidden_size} / {m.intermediate_size}"),
        ("heads / kv heads / head dim", f"{m.num_heads} / {m.num_kv_heads} / {m.head_dim}"),
        ("vocab", str(m.vocab_size)),
        ("rope", f"theta {m.rope_theta:g}, {m.rope_type}"),
        ("rms eps", f"{m.rms_norm_eps:g}"),
        ("max positions", str(m.max_position_embeddings)),
        ("tied embeddings", str(m.tie_word_embeddings)),
        ("kv cache", f"{manifest.kv_cache.layout} {manifest.kv_cache.shape}"),
        (
            "eos / pad / bos",
            f"{manifest.eos_token_ids} / {manifest.pad_token_id} / {manifest.bos_token_id}",
        ),
        ("generation", _fields(manifest.generation)),
        ("chat template", "yes" if manifest.chat_template else "no"),
        ("inputs", ", ".join(t.name for t in manifest.inputs[:3]) + ", past_key_values.*"),
        ("outputs", "logits, present.*"),
    ]
    if manifest.engine is not None:
        rows.append(("engine", _fields(manifest.engine)))
    if manifest.quality is not None:
        rows.append(("quality", _fields(manifest.quality)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
