"""Back the process's large, resident anonymous memory with transparent huge pages (Linux).

A CPU decode step streams every weight from memory once. onnxruntime holds the (prepacked) weights
in anonymous memory, which the kernel maps with 4 KiB pages unless a program asks for more (THP
mode `madvise`, the usual default): a 2 GB model then costs ~500k TLB misses per token. Asking the
kernel to collapse those regions into 2 MiB pages made Qwen2-0.5B fp32 decode 15.1-15.3 tok/s
instead of 14.0-14.5 on the 2-core reference machine. Only regions that are almost fully resident
are collapsed, so reserved-but-untouched memory is not filled in. Best effort: kernels without
MADV_COLLAPSE (Linux < 6.1), THP turned off, or other systems leave memory as it is.
"""

from __future__ import annotations

import ctypes
import re
import sys
from dataclasses import dataclass

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE_PAGE = 2 << 20
MIN_REGION = 64 << 20
MIN_RESIDENT = 0.9

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


@dataclass
class Region:
    start: int
    end: int
    writable: bool
    path: str
    rss: int = 0  # bytes
    huge: int = 0  # bytes already in transparent huge pages

    @property
    def anonymous(self) -> bool:
        return self.path in ("", "[heap]")


def parse_smaps(text: str) -> list[Region]:
    """The mappings of a /proc/PID/smaps text, with their resident and huge-page bytes."""
    regions: list[Region] = []
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            start, end, perms, path = header.groups()
            regions.append(Region(int(start, 16), int(end, 16), "w" in perms, path.strip()))
        elif regions and line.startswith(("Rss:", "AnonHugePages:")):
            kib = int(line.split()[1]) * 1024
            if line.startswith("Rss:"):
                regions[-1].rss = kib
            else:
                regions[-1].huge = kib
    return regions


def candidates(
    regions: list[Region], min_bytes: int = MIN_REGION, min_resident: float = MIN_RESIDENT
) -> list[tuple[int, int]]:
    """Huge-page-aligned [start, end) ranges of big, writable, anonymous, resident regions."""
    ranges = []
    for r in regions:
        size = r.end - r.start
        if not (r.anonymous and r.writable) or size < min_bytes or r.rss < min_resident * size:
            continue
        start = -(-r.start // HUGE_PAGE) * HUGE_PAGE
        end = r.end // HUGE_PAGE * HUGE_PAGE
        if end > start:
            ranges.append((start, end))
    return ranges


def collapse_resident_memory(
    min_bytes: int = MIN_REGION, min_resident: float = MIN_RESIDENT
) -> int:
    """Collapse this process's big resident anonymous regions into huge pages; bytes collapsed."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open("/proc/self/smaps") as f:
            regions = parse_smaps(f.read())
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    for start, end in candidates(regions, min_bytes, min_resident):
        madvise(start, end - start, MADV_HUGEPAGE)  # also keeps khugepaged from undoing it
        if madvise(start, end - start, MADV_COLLAPSE) == 0:
            collapsed += end - start
    return collapsed
