"""The few CUDA driver calls the TensorRT path needs, through ctypes on the driver library.

TensorRT's Python API takes raw device pointers and stream handles but allocates nothing for the
caller. The driver library (libcuda) is present wherever an NVIDIA GPU is, so this adds no
dependency (no torch in the runtime, no cuda-python wheel to match to the CUDA version).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import QwenDeployError

CUDA_ERROR_NO_DEVICE = 100
ATTR_CC_MAJOR, ATTR_CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / MINOR
LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to: TensorRT plans run only on the compute capability they target."""

    index: int
    name: str
    compute_capability: str
    total_memory: int

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "compute_capability": self.compute_capability,
            "total_memory_bytes": self.total_memory,
        }


class CudaDriver:
    """Device queries, device memory, async copies and streams on one device's primary context."""

    def __init__(self, device: int = 0):
        try:
            self.lib = ctypes.CDLL(LIBRARY)
        except OSError:
            raise QwenDeployError(
                f"no NVIDIA driver here ({LIBRARY} not found): TensorRT needs an NVIDIA GPU and "
                "its driver; run this on a GPU machine."
            ) from None
        result = self.lib.cuInit(0)
        if result == CUDA_ERROR_NO_DEVICE:
            raise QwenDeployError(
                "no CUDA GPU visible (CUDA_ERROR_NO_DEVICE); check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES."
            )
        self._check(result, "cuInit")
        count = ctypes.c_int()
        self._check(self.lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if not 0 <= device < count.value:
            raise QwenDeployError(f"CUDA device {device} does not exist ({count.value} visible).")
        self.index = device
        self.device = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(self.device), device), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self._check(
            self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), self.device),
            "cuDevicePrimaryCtxRetain",
        )
        self._check(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def _check(self, result: int, call: str) -> None:
        if result:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(result, ctypes.byref(text))
            message = text.value.decode() if text.value else "unknown error"
            raise QwenDeployError(f"CUDA driver call {call} failed: {message} (code {result}).")

    def info(self) -> DeviceInfo:
        name = ctypes.create_string_buffer(256)
        self._check(self.lib.cuDeviceGetName(name, 256, self.device), "cuDeviceGetName")
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(
            self.lib.cuDeviceGetAttribute(ctypes.byref(major), ATTR_CC_MAJOR, self.device),
            "cuDeviceGetAttribute",
        )
        self._check(
            self.lib.cuDeviceGetAttribute(ctypes.byref(minor), ATTR_CC_MINOR, self.device),
            "cuDeviceGetAttribute",
        )
        total = ctypes.c_size_t()
        self._check(
            self.lib.cuDeviceTotalMem_v2(ctypes.byref(total), self.device), "cuDeviceTotalMem"
        )
        return DeviceInfo(
            self.index, name.value.decode(), f"{major.value}.{minor.value}", total.value
        )

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._check(
            self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))),
            f"cuMemAlloc({nbytes} bytes)",
        )
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self.lib.cuMemFree_v2(ctypes.c_uint64(ptr)), "cuMemFree")

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        self._check(self.lib.cuStreamCreate(ctypes.byref(handle), 0), "cuStreamCreate")
        return handle.value or 0

    def synchronize(self, stream: int) -> None:
        self._check(self.lib.cuStreamSynchronize(ctypes.c_void_p(stream)), "cuStreamSynchronize")

    def upload(self, dst: int, array: np.ndarray, stream: int) -> None:
        """Host -> device copy of a C-contiguous array (the array must outlive the copy)."""
        self._check(
            self.lib.cuMemcpyHtoDAsync_v2(
                ctypes.c_uint64(dst),
                ctypes.c_void_p(array.ctypes.data),
                ctypes.c_size_t(array.nbytes),
                ctypes.c_void_p(stream),
            ),
            "cuMemcpyHtoDAsync",
        )

    def download(self, out: np.ndarray, src: int, stream: int) -> None:
        """Device -> host copy into a C-contiguous array."""
        self._check(
            self.lib.cuMemcpyDtoHAsync_v2(
                ctypes.c_void_p(out.ctypes.data),
                ctypes.c_uint64(src),
                ctypes.c_size_t(out.nbytes),
                ctypes.c_void_p(stream),
            ),
            "cuMemcpyDtoHAsync",
        )


class DeviceBuffer:
    """One device allocation that grows on demand (contents are not kept when it grows)."""

    def __init__(self, driver: CudaDriver, nbytes: int = 0):
        self.driver = driver
        self.nbytes = 0
        self.ptr = 0
        self.reserve(nbytes)

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.release()
            self.ptr = self.driver.alloc(nbytes)
            self.nbytes = nbytes
        return self.ptr

    def release(self) -> None:
        if self.ptr:
            self.driver.free(self.ptr)
            self.ptr, self.nbytes = 0, 0

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter exit the driver may be gone
            self.release()
