"""What an artifact's files must be: their sizes and hashes, recorded in its manifest.

Opening an artifact compares sizes (a stat per file, always); `inspect --verify`, `triton` and
`build` read every byte and compare hashes. xxh3-128 runs at memory speed, so verifying a 15 GB
model costs the read, not the hash.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import xxhash

from .errors import ArtifactError

HASH = "xxh3_128"
CHUNK = 16 * 2**20
# Not part of the record: the manifest holds the record, the marker says who wrote the folder.
UNRECORDED = ("manifest.json", ".qwen-deploy")


def _files(folder: Path) -> list[Path]:
    files = (p for p in folder.rglob("*") if p.is_file())
    return sorted(p for p in files if p.relative_to(folder).parts[0] not in UNRECORDED)


def file_hash(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


def file_records(folder: str | Path) -> dict[str, dict]:
    """Every file of the folder (relative POSIX path) with its size and hash."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, HASH: file_hash(p)}
        for p in _files(folder)
    }


def check_sizes(folder: str | Path, records: dict[str, dict], fix: str) -> None:
    """Refuse a folder whose recorded files are missing or of another size (cheap: no reads)."""
    folder = Path(folder)
    for name, record in records.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"artifact {folder} is incomplete: {name} is missing; {fix}.")
        size = path.stat().st_size
        if size != record["size"]:
            raise ArtifactError(
                f"artifact {folder} is damaged: {name} is {size:,} bytes, its manifest records "
                f"{record['size']:,} (truncated or replaced); {fix}."
            )


def verify_hashes(
    folder: str | Path,
    records: dict[str, dict],
    fix: str,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Read every recorded file and compare its hash with the record (after the sizes)."""
    folder = Path(folder)
    check_sizes(folder, records, fix)
    for name, record in records.items():
        if file_hash(folder / name, on_bytes) != record[HASH]:
            raise ArtifactError(
                f"artifact {folder} is damaged: {name} does not match the hash its manifest "
                f"records (its bytes changed on disk); {fix}."
            )
