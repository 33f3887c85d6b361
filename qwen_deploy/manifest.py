"""The artifact contract: manifest.json, read by every later stage and by C++/Triton users.

A stage never guesses what an earlier stage did; it reads this file. Field meanings are documented
in docs/artifact.md; bump FORMAT_VERSION on any incompatible change.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .checkpoint.huggingface import ModelSpec
from .contract import kv_pairs
from .errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16")
ATTENTION_FORMS = ("onnx", "gqa", "decomposed")


def producer_record(**stage) -> dict:
    """manifest.producer: this qwen-deploy version, the time, and what the stage adds."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"name": "qwen-deploy", "version": __version__, "created": created, **stage}


@dataclass
class TensorSpec:
    """One graph input or output: name, ONNX element type name and shape (ints or dim names)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class Manifest:
    model: ModelSpec
    precision: str
    attention: str
    opset: int
    model_file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: dict
    eos_token_ids: list[int]
    pad_token_id: int | None
    bos_token_id: int | None
    generation: dict
    chat_template: str | None
    tokenizer_files: list[str]
    data_files: list[str] = field(default_factory=list)
    kv_cache: dict = field(default_factory=dict)
    optional_inputs: list[dict] = field(default_factory=list)
    quantization: dict | None = None
    quality: dict | None = None
    engine: dict | None = None
    producer: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        data = asdict(self)
        data["model"] = self.model.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"manifest format_version is {version}, this qwen-deploy reads {FORMAT_VERSION}; "
                "re-export the artifact with this version."
            )
        data = dict(data)
        data["model"] = ModelSpec.from_dict(data["model"])
        data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, folder: Path) -> None:
        (Path(folder) / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not Path(folder).is_dir():
            raise ArtifactError(
                f"artifact folder {folder} does not exist; run `qwen-deploy export`."
            )
        if not path.is_file():
            raise ArtifactError(
                f"{folder} has no {MANIFEST}; it is not a qwen-deploy artifact (or an export was "
                "interrupted): re-run `qwen-deploy export`."
            )
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ArtifactError(f"{path} is malformed ({e}); re-export the artifact.") from e

    @property
    def pad_id(self) -> int:
        """The id for left-padding slots: pad_token_id, else the first EOS id, else 0; an id
        outside the vocabulary becomes 0 (padded positions are masked, any valid id works)."""
        pad = self.pad_token_id
        if pad is None:
            pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        return pad if 0 <= pad < self.model.vocab_size else 0

    def kv_pairs(self) -> list[tuple[str, str]]:
        """(past, present) tensor names of every layer's key and value, in layer order."""
        return kv_pairs(self.model.num_layers)
