"""The artifact contract: manifest.json, read by every later stage and by C++/Triton users.

A stage never guesses what an earlier stage did; it reads this file. Field meanings are documented
in docs/artifact.md; bump FORMAT_VERSION on any incompatible change.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .checkpoint.huggingface import ModelSpec
from .contract import kv_pairs
from .errors import ArtifactError
from .integrity import check_sizes, file_records, verify_hashes
from .records import OWN_LENGTH, Engine, Generation, KVCache, Quality, Quantization

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16")
ATTENTION_FORMS = ("onnx", "gqa", "decomposed")
# per MatMulNBits mode, the largest block (input channels per weight scale) at which onnxruntime's
# CPU kernel computes each row of a step bit for bit as it would alone: the default blocks
ROW_INDEPENDENT_BLOCK = {"int4-weight": 32, "int8-weight": 64, "int8-dynamic": 64}
# the open-ended sections, read into and written from their records
RECORDS = {
    "generation": Generation,
    "kv_cache": KVCache,
    "quantization": Quantization,
    "quality": Quality,
    "engine": Engine,
}


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


def _empty_kv_cache() -> KVCache:
    return KVCache.from_dict({})  # an artifact without the section writes `{}` back


@dataclass
class Manifest:
    """manifest.json as typed values. The open-ended sections are records (records.py):
    `generation` and `kv_cache` are always there (what older artifacts lack reads as defaults);
    `quantization`, `quality` and `engine` are None where the artifact has none (float, not
    quantized, ONNX)."""

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
    generation: Generation
    chat_template: str | None
    tokenizer_files: list[str]
    data_files: list[str] = field(default_factory=list)
    kv_cache: KVCache = field(default_factory=_empty_kv_cache)
    optional_inputs: list[dict] = field(default_factory=list)
    quantization: Quantization | None = None
    quality: Quality | None = None
    engine: Engine | None = None
    producer: dict = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        """The JSON object, keys in field order (what save writes)."""
        data = asdict(self)
        data["model"] = self.model.to_dict()
        for name in RECORDS:
            record = getattr(self, name)
            data[name] = None if record is None else record.to_dict()
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
        for name, record in RECORDS.items():
            if data.get(name) is not None:
                data[name] = record.from_dict(data[name])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, folder: Path) -> None:
        """Write manifest.json with the size and hash of every file now in `folder`: save it
        after the artifact's last file."""
        self.files = file_records(folder)
        (Path(folder) / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Read the manifest and check that every file it records is there at its size."""
        manifest = cls.read(folder)
        manifest.check_files(folder)
        return manifest

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest as written, its files unchecked: for a stage that rewrites a file and
        saves the manifest again."""
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
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{path} is malformed ({e}); re-export the artifact.") from e

    def rewrite_hint(self) -> str:
        """How to get an intact copy: re-run the stage that wrote this artifact."""
        if self.engine is not None:
            return "rebuild it with `qwen-deploy build`"
        if self.producer.get("stage") == "quantize":
            return "re-run `qwen-deploy quantize` on its source"
        return "re-export it with `qwen-deploy export`"

    def check_files(self, folder: str | Path) -> None:
        """Sizes only (a stat per file). Artifacts written before files were recorded get an
        existence check of their model and weight files."""
        if self.files:
            check_sizes(folder, self.files, self.rewrite_hint())
            return
        for name in [self.model_file, *self.data_files]:
            path = Path(folder) / name
            if not path.is_file() or path.stat().st_size == 0:
                state = "missing" if not path.is_file() else "empty"
                raise ArtifactError(
                    f"artifact {folder} is incomplete: {name} is {state}; {self.rewrite_hint()}."
                )

    def verify(self, folder: str | Path, progress: bool = False) -> None:
        """Every recorded file read and hashed against the manifest (a full read)."""
        if not self.files:
            raise ArtifactError(
                f"artifact {folder} records no file hashes (written by an older qwen-deploy); "
                f"{self.rewrite_hint()} to record them."
            )
        total = sum(record["size"] for record in self.files.values())
        bar = tqdm(total=total, desc="verify", unit="B", unit_scale=True, disable=not progress)
        with bar:
            verify_hashes(folder, self.files, self.rewrite_hint(), bar.update)

    @property
    def pad_id(self) -> int:
        """The id for left-padding slots: pad_token_id, else the first EOS id, else 0; an id
        outside the vocabulary becomes 0 (padded positions are masked, any valid id works)."""
        pad = self.pad_token_id
        if pad is None:
            pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        return pad if 0 <= pad < self.model.vocab_size else 0

    @property
    def quantization_mode(self) -> str | None:
        """The quantization mode, None for a float artifact."""
        return None if self.quantization is None else self.quantization.mode

    @property
    def own_row_lengths(self) -> bool:
        """Whether the artifact's cache rows may keep lengths of their own (right-padded): an
        ONNX graph that says so; a TensorRT engine's rows are left-padded."""
        return self.engine is None and self.kv_cache.rows == OWN_LENGTH

    @property
    def row_independent_kernels(self) -> bool:
        """Whether a row's result does not depend on the other rows of its step: onnxruntime's
        CPU MatMulNBits rounds a row differently beside others at blocks over ROW_INDEPENDENT_BLOCK
        (measured, benchmarks/README.md), which the opt-in --block-size values give; an fp16
        artifact's GEMMs (float32 compute from weights widened at every step on CPU, fp16 ones on
        GPUs) do too."""
        if self.precision == "fp16":
            return False
        q = self.quantization
        if q is None or q.mode not in ROW_INDEPENDENT_BLOCK:
            return True
        return (q.block_size or 0) <= ROW_INDEPENDENT_BLOCK[q.mode]

    def kv_pairs(self) -> list[tuple[str, str]]:
        """(past, present) tensor names of every layer's key and value, in layer order."""
        return kv_pairs(self.model.num_layers)


@dataclass(frozen=True)
class Artifact:
    """An artifact folder with its manifest, read (and its file sizes checked) once: what every
    stage that runs an artifact passes down instead of the folder."""

    folder: Path
    manifest: Manifest

    @classmethod
    def open(cls, source: str | Path | Artifact) -> Artifact:
        """`source` itself when already open, else the folder's manifest loaded."""
        if isinstance(source, Artifact):
            return source
        return cls(Path(source), Manifest.load(source))

    def __str__(self) -> str:
        return str(self.folder)
