"""Artifact folders appear only when complete: write to a temp folder, rename at the end."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import QwenDeployError

SIDE_FILES = ("generation_config.json", "config.json")


def copy_side_files(source: Path, out: Path, tokenizer_files: list[str]) -> None:
    """Tokenizer files, generation_config.json, config.json: each artifact stays self-contained."""
    for name in [*tokenizer_files, *SIDE_FILES]:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


def check_output(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless forced (checked before any work starts)."""
    if out.exists() and not force:
        raise QwenDeployError(
            f"output {out} already exists; choose another path or pass --force to replace it."
        )


@contextlib.contextmanager
def staged_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to `out`; on success it replaces `out`, on any failure it vanishes.

    The temp folder is a sibling so the final rename stays on one filesystem (atomic, no copy).
    """
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; artifacts are shared with servers and users
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    tmp.rename(out)
