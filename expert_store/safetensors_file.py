"""Read-only access to safetensors files: headers, lazy tensors, zero-copy byte views.

The safetensors layout is 8 bytes of little-endian header length, a JSON header mapping each tensor
name to its dtype, shape and ``data_offsets`` (relative to the end of the header), then raw bytes.
Reading the header ourselves lets the store hand out views of a memory map (one copy into a slot,
no intermediate tensor) while ``safe_open`` stays the reader for everything else.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from expert_store.errors import StoreError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor's bytes lie in its file (absolute offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for one safetensors file; a malformed file is a StoreError."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as error:
        raise StoreError(f"{path} is not a readable safetensors file ({error})") from error
    base = 8 + length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        infos[name] = TensorInfo(DTYPES[entry["dtype"]], tuple(entry["shape"]), base + start, base + end)
    return infos


class MappedFile:
    """A safetensors file memory-mapped read-only, handing out tensor views without copying."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.infos = read_header(path)
        with open(path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def raw(self, start: int, end: int) -> memoryview:
        """The bytes [start, end) of the file, without copying."""
        if end > len(self._map):
            raise StoreError(f"{self.path} is truncated: needs {end} bytes, has {len(self._map)}")
        return memoryview(self._map)[start:end]

    def release(self, start: int, end: int) -> None:
        """Tell the kernel this process no longer needs the pages of [start, end) (they stay in the
        page cache): once an expert is copied into its slot, its mapped bytes leave the process's RSS."""
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, (end // page) * page
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        # Tensors may still view the map; it is then unmapped when the last of them is freed.
        with contextlib.suppress(BufferError):
            self._map.close()
