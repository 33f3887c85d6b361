"""Huge pages for the weights: which regions are chosen, and that the kernel collapses them."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen_deploy.runtime.huge_pages import (
    HUGE_PAGE,
    candidates,
    collapse_resident_memory,
    parse_smaps,
)

MIB = 1 << 20

SMAPS = """\
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              262144 kB
AnonHugePages:         0 kB
7f0010000000-7f0020000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:                4096 kB
AnonHugePages:         0 kB
7f0020000000-7f0030000000 r--p 00000000 08:01 1234    /work/model.onnx.data
Size:             262144 kB
Rss:              262144 kB
7f0030000000-7f0030400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                4096 kB
7f0040100000-7f0048100000 rw-p 00000000 00:00 0                 [heap]
Size:             131072 kB
Rss:              131072 kB
AnonHugePages:      2048 kB
"""


def test_parse_smaps_reads_each_mapping():
    regions = parse_smaps(SMAPS)
    assert [(r.path, r.writable, r.rss // MIB, r.huge // MIB) for r in regions] == [
        ("", True, 256, 0),
        ("", True, 4, 0),
        ("/work/model.onnx.data", False, 256, 0),
        ("", True, 4, 0),
        ("[heap]", True, 128, 2),
    ]


def test_only_big_resident_anonymous_regions_are_chosen_aligned_to_huge_pages():
    ranges = candidates(parse_smaps(SMAPS))
    # the sparse region (4 of 256 MiB resident), the file mapping and the 4 MiB region are left
    assert ranges == [
        (0x7F0000000000, 0x7F0010000000),
        (0x7F0040200000, 0x7F0048000000),  # [heap] rounded inwards to 2 MiB boundaries
    ]
    assert all(start % HUGE_PAGE == 0 and end % HUGE_PAGE == 0 for start, end in ranges)


def _thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.is_file():
        return "absent"
    return path.read_text().split("[")[1].split("]")[0]


def _huge_bytes_in(array: np.ndarray) -> int:
    """Huge-page bytes of the mappings under `array` (numpy's own madvise may split them)."""
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    regions = parse_smaps(Path("/proc/self/smaps").read_text())
    return sum(r.huge for r in regions if r.start < end and start < r.end)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages: Linux")
def test_a_resident_array_ends_up_in_huge_pages():
    if _thp_mode() in ("never", "absent"):
        pytest.skip(f"transparent huge pages are off on this kernel ({_thp_mode()})")
    # plain anonymous memory, touched (resident in 4 KiB pages), as onnxruntime allocates it;
    # numpy's own allocator would already ask for huge pages
    memory = mmap.mmap(-1, 96 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    weights = np.frombuffer(memory, np.float32)
    weights[:] = 1.0
    before = _huge_bytes_in(weights)
    collapsed = collapse_resident_memory()
    if collapsed == 0:
        pytest.skip("this kernel refused MADV_COLLAPSE (needs Linux >= 6.1)")
    assert _huge_bytes_in(weights) >= before + 64 * MIB
    assert float(weights.sum()) == weights.size  # contents unchanged
