"""Output folders appear only when complete, and --force replaces only what qwen-deploy wrote.

Every output is written into a temp folder next to it and renamed at the end. A marker file
records who wrote a folder and which files: a finished output's lists them (what `--force` may
replace), a partial one's names its process (a later run removes it once that process is gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import QwenDeployError

SIDE_FILES = ("generation_config.json", "config.json")
MARKER = ".qwen-deploy"
STOP_SIGNALS = ("SIGTERM", "SIGHUP")


def copy_side_files(source: Path, out: Path, tokenizer_files: list[str]) -> None:
    """Tokenizer files, generation_config.json, config.json: each artifact stays self-contained."""
    for name in [*tokenizer_files, *SIDE_FILES]:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


def _legacy_artifact_files(folder: Path) -> set[str] | None:
    """The files of an artifact written before the marker existed, from its manifest."""
    manifest = _read_json(folder / "manifest.json")
    if (manifest.get("producer") or {}).get("name") != "qwen-deploy":
        return None
    engine = manifest.get("engine") or {}
    return {
        "manifest.json",
        "genai_config.json",
        *SIDE_FILES,
        str(manifest.get("model_file")),
        *map(str, manifest.get("data_files") or []),
        *map(str, manifest.get("tokenizer_files") or []),
        *map(str, engine.get("plugin_libraries") or []),
    }


def written_files(folder: Path) -> set[str] | None:
    """The files qwen-deploy wrote into `folder` (None when it did not write the folder)."""
    marker = _read_json(folder / MARKER)
    if marker.get("written_by") == "qwen-deploy" and "files" in marker:
        return {MARKER, *marker["files"]}
    return _legacy_artifact_files(folder)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: str | Path, force: bool, sources: Sequence[str | Path] = ()) -> None:
    """Refuse an output that would overwrite an input, or anything qwen-deploy did not write
    (checked before any work starts, and again right before the replacement)."""
    out = Path(out)
    target = out.resolve()
    for source in sources:
        if _is_within(Path(source).resolve(), target):
            relation = "is" if Path(source).resolve() == target else "contains"
            raise QwenDeployError(
                f"the output {out} {relation} the input {source}; choose an output folder "
                "outside the input."
            )
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise QwenDeployError(
            f"output {out} already exists; choose another path or pass --force to replace it."
        )
    if out.is_symlink() or not out.is_dir():
        raise QwenDeployError(
            f"--force replaces only a folder qwen-deploy wrote, and {out} is "
            f"{'a link' if out.is_symlink() else 'a file'}; remove it yourself or choose "
            "another path."
        )
    present = _files(out)
    if not present:
        return
    ours = written_files(out)
    if ours is None:
        raise QwenDeployError(
            f"--force replaces only a folder qwen-deploy wrote (an artifact, a checkpoint or a "
            f"Triton repository) or an empty one, and {out} is not one; remove it yourself or "
            "choose another path."
        )
    foreign = sorted(present - ours)
    if foreign:
        raise QwenDeployError(
            f"--force would delete {out / foreign[0]}, which qwen-deploy did not write; move it "
            "out of the folder or choose another path."
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Partial folders of `out` left by a run that was killed (its process gone, this host)."""
    removed = []
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        marker = _read_json(partial / MARKER)
        pid = marker.get("pid")
        if (
            marker.get("written_by") == "qwen-deploy"
            and marker.get("partial_of") == out.name
            and marker.get("host") == socket.gethostname()
            and isinstance(pid, int)
            and not _process_alive(pid)
        ):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


def _write_marker(folder: Path, **record) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": "qwen-deploy", **record}) + "\n")


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the partial output is removed (main thread
    only: Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame) -> None:
        print(f"stopped by {signal.Signals(signum).name}: partial output removed", file=sys.stderr)
        raise SystemExit(128 + signum)

    signums = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    previous = {s: signal.signal(s, stop) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def staged_output(
    out: str | Path, force: bool = False, sources: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temp folder next to `out`; on success it replaces `out`, on any failure or stop
    signal it vanishes.

    The temp folder is a sibling so the final rename stays on one filesystem (atomic, no copy).
    """
    out = Path(out)
    check_output(out, force, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; artifacts are shared with servers and users
    _write_marker(tmp, partial_of=out.name, pid=os.getpid(), host=socket.gethostname())
    try:
        with _stop_signals_raise():
            yield tmp
            _write_marker(tmp, files=sorted(_files(tmp) - {MARKER}))
            check_output(out, force, sources)
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
                out.rename(old / out.name)
                tmp.rename(out)
                shutil.rmtree(old)
            else:
                tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
