"""Measurement helpers for the benchmarks: child processes with their own peak RSS, disk speed.

Each measured job runs in a fresh interpreter so that its peak RSS is its own: the child reports
the kernel's high-water mark (VmHWM in /proc/self/status, reset at exec). A one-shot job
(`run_child`) is a function run to completion, while the parent polls the child's anonymous RSS
(heap, not page-cache-backed file maps) to tell the two apart; a long-lived engine (`Worker`) is
an object the parent calls over a pipe, turn by turn with others.

Run as a script, this file is that child: `python _common.py module:function result.json KWARGS`.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
GB = 1e9


def _status_kib(pid: int | str, key: str) -> int | None:
    """One `kB` field of /proc/<pid>/status (VmHWM, VmRSS, RssAnon), or None where absent."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return None


@dataclass
class ChildResult:
    """What one child job measured: its own report plus peak memory."""

    wall_s: float  # whole child, interpreter start and imports included
    peak_rss: int  # bytes, the kernel's high-water mark of the child's RSS
    peak_anon: int  # bytes, polled peak of anonymous RSS (excludes memory-mapped file pages)
    report: dict = field(default_factory=dict)
    error: str | None = None


def run_child(target: str, kwargs: dict, poll_s: float = 0.02, quiet: bool = True) -> ChildResult:
    """Run `module:function(**kwargs)` (module from this folder) in a fresh Python; measure it.

    The function returns a JSON-able dict (its own timings); stderr (progress bars, warnings) is
    discarded when `quiet`, otherwise passed through.
    """
    with tempfile.TemporaryDirectory(prefix="qd-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(HERE / "_common.py"),
            target,
            str(result_file),
            json.dumps(kwargs),
        ]
        start = time.perf_counter()
        sink = subprocess.DEVNULL if quiet else None
        proc = subprocess.Popen(cmd, stdout=sink, stderr=sink)
        peak_anon = 0
        while proc.poll() is None:
            anon = _status_kib(proc.pid, "RssAnon")
            if anon is not None:
                peak_anon = max(peak_anon, anon * 1024)
            time.sleep(poll_s)
        wall = time.perf_counter() - start
        if not result_file.is_file():
            return ChildResult(wall, 0, peak_anon, error=f"child exited {proc.returncode}")
        data = json.loads(result_file.read_text())
    return ChildResult(
        wall_s=wall,
        peak_rss=data["vmhwm_kib"] * 1024,
        peak_anon=max(peak_anon, data.get("rss_anon_kib", 0) * 1024),
        report=data.get("report") or {},
        error=data.get("error"),
    )


def _resolve(target: str) -> Any:
    """The object `module:name` names."""
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)


def _child_main(target: str, result_file: str, kwargs_json: str) -> int:
    out: dict = {}
    code = 0
    try:
        out["report"] = _resolve(target)(**json.loads(kwargs_json))
    except Exception as e:  # reported to the parent, which prints it next to the numbers
        out["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
        out["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
        code = 1
    out["vmhwm_kib"] = _status_kib("self", "VmHWM") or 0
    out["rss_anon_kib"] = _status_kib("self", "RssAnon") or 0
    Path(result_file).write_text(json.dumps(out))
    return code


class WorkerError(Exception):
    """A Worker's child failed: the message names the worker and holds the child's traceback
    (or, when the child died, its exit code)."""


class Worker:
    """`module:Class(*args)` built in a fresh spawned process and called over a pipe: its peak
    RSS and thread pools are its own, and several take turns on one machine.

    A context manager: leaving it kills a child that `close` did not stop.
    """

    def __init__(self, target: str, *args: Any, name: str | None = None):
        context = multiprocessing.get_context("spawn")
        self.name = name or target
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(target, args, child))
        self.process.start()
        child.close()
        self._receive()

    def _receive(self) -> Any:
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.process.join()
            status, value = "error", f"the process died (exit code {self.process.exitcode})"
        if status == "error":
            self.process.kill()
            self.process.join()
            raise WorkerError(f"{self.name} failed:\n{value}")
        return value

    def call(self, method: str, *args: Any) -> Any:
        """The object's `method(*args)`, run in the child (arguments and result are pickled)."""
        self.conn.send((method, args))
        return self._receive()

    def close(self) -> float:
        """Stop the child; returns its peak RSS in MB (its own VmHWM, not its parent's)."""
        self.conn.send((None, ()))
        peak_kib = self._receive()
        self.process.join()
        return peak_kib / 1024

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *_: object) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


def _serve(target: str, args: tuple, conn) -> None:
    """A Worker's child: build the object, then answer (method, args) calls until (None, ()),
    answered with this process's peak RSS in KiB."""
    try:
        obj = _resolve(target)(*args)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        method, call_args = conn.recv()
        if method is None:
            conn.send(("ok", _status_kib("self", "VmHWM") or 0))
            return
        try:
            conn.send(("ok", getattr(obj, method)(*call_args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def drop_file_cache(path: Path) -> None:
    """Evict one file's pages from the page cache (only ours, not the whole system's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> float:
    """Flush one file's dirty pages to disk; returns the seconds it took."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def disk_speed(folder: Path, size_bytes: int = 2 << 30, block: int = 64 * MiB) -> dict:
    """Sequential write (ending with fsync) and cold read of one file, in bytes per second.

    The read runs after the file's pages are evicted from the cache, so it is the disk's speed.
    """
    path = folder / "disk-speed.bin"
    data = os.urandom(block)
    try:
        start = time.perf_counter()
        with path.open("wb") as f:
            for _ in range(size_bytes // block):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        write_s = time.perf_counter() - start
        drop_file_cache(path)
        start = time.perf_counter()
        with path.open("rb", buffering=0) as f:
            buf = bytearray(block)
            while f.readinto(buf):
                pass
        read_s = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    size = (size_bytes // block) * block
    return {"bytes": size, "write_Bps": size / write_s, "read_Bps": size / read_s}


def free_disk(folder: Path) -> int:
    return psutil.disk_usage(str(folder)).free


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


if __name__ == "__main__":
    sys.exit(_child_main(*sys.argv[1:4]))
