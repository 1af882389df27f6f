"""Reading a store: dense weights once, experts one by one from the layer shards.

A request for 8 of 256 experts touches 8 experts' bytes. Into CPU memory of the store's dtype an
expert is read straight into its destination (``read_into``: one copy, from the page cache, with
no mapping to fault in or release); otherwise ``expert`` hands out views of a memory map. Each expert's bytes are checked against
the manifest's xxh3-64 the first time this process reads them (``verify="first"``; "always" and
"never" are the other choices), so a flipped byte is an error that names the file and the expert,
never silent garbage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig

from expert_store.errors import CorruptExpertError, StoreError
from expert_store.hashing import sha256_file, xxh3_of
from expert_store.keys import ExpertKey
from expert_store.manifest import Manifest
from expert_store.quant import get_scheme
from expert_store.safetensors_file import DTYPE_NAMES, DTYPES, MappedFile, read_header

logger = logging.getLogger(__name__)

Verify = Literal["first", "always", "never"]


@dataclass(frozen=True, slots=True)
class ExpertTensors:
    """One expert's weights as stored: read-only views of the store's memory map (copy before
    writing). 8-bit stores add each weight's float32 scale, per output channel or per block."""

    gate_up: torch.Tensor  # [2I, D]
    down: torch.Tensor  # [D, I]
    gate_up_scale: torch.Tensor | None = None  # [2I] (blocks of 128: [ceil(2I/128), ceil(D/128)])
    down_scale: torch.Tensor | None = None  # [D] (blocks of 128: [ceil(D/128), ceil(I/128)])

    def parts(self) -> tuple[torch.Tensor, ...]:
        """The tensors in the manifest's checksum order: weights, then scales if any."""
        scales = (self.gate_up_scale, self.down_scale)
        return (self.gate_up, self.down, *(t for t in scales if t is not None))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts())


class ExpertStore:
    """An opened store directory."""

    def __init__(self, store_dir: Path, verify: Verify = "first") -> None:
        self.store_dir = Path(store_dir)
        self.manifest = Manifest.load(self.store_dir)
        self.verify = verify
        for entry in [*self.manifest.dense_files, *self.manifest.expert_files]:
            if not (self.store_dir / entry.path).exists():
                raise StoreError(f"store file {self.store_dir / entry.path} is missing; re-run `taer shard`")
        self._maps: dict[str, MappedFile] = {}
        self._fds: dict[str, int] = {}
        self._verified: set[ExpertKey] = set()
        layout = self.manifest.layout
        self.scheme = get_scheme(self.manifest.expert_scheme)
        self.dtype = self.scheme.weight_dtype or DTYPES[self.manifest.dtype]  # of the stored weights
        two_i, d, i = 2 * layout.intermediate_size, layout.hidden_size, layout.intermediate_size
        # (dtype, shape) of each part, in ExpertTensors.parts() order
        self._parts = [(self.dtype, (two_i, d)), (self.dtype, (d, i))]
        if self.scheme.is_quantized:
            scales = (self.scheme.scale_shape(two_i, d), self.scheme.scale_shape(d, i))
            self._parts += [(torch.float32, shape) for shape in scales]
        for entry in self.manifest.expert_files:
            self._check_dtypes(entry.path)

    @property
    def layout(self):
        return self.manifest.layout

    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.store_dir)

    def dense_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every dense tensor (name as in the model's state dict), one at a time."""
        for entry in self.manifest.dense_files:
            with safe_open(str(self.store_dir / entry.path), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)

    def expert(self, key: ExpertKey) -> ExpertTensors:
        """Views of one expert's bytes (weights and any scales), checked against the manifest as
        ``verify`` says."""
        entry = self.manifest.entry(key)
        mapped = self._mapped(entry.file)
        raws = [mapped.raw(*byte_range) for byte_range in entry.ranges]
        if self.verify == "always" or (self.verify == "first" and key not in self._verified):
            if xxh3_of(*raws) != entry.xxh3:
                raise CorruptExpertError(str(mapped.path), key.layer, key.expert)
            self._verified.add(key)
        return ExpertTensors(
            *(_view(raw, dtype, shape) for raw, (dtype, shape) in zip(raws, self._parts, strict=True))
        )

    def can_read_into(self, *parts: torch.Tensor) -> bool:
        """Whether :meth:`read_into` can fill ``parts`` (ExpertTensors.parts() order): every part of
        the expert given, each in CPU memory, contiguous, of the stored dtype."""
        return len(parts) == len(self._parts) and all(
            t.device.type == "cpu" and t.is_contiguous() and t.dtype == dtype
            for t, (dtype, _) in zip(parts, self._parts, strict=True)
        )

    def read_into(self, key: ExpertKey, *parts: torch.Tensor) -> None:
        """Read one expert's bytes from its file into ``parts``: ``gate_up`` [2I, D] and ``down``
        [D, I], then for an 8-bit store their scales [2I] and [D]; checked against the manifest as
        ``verify`` says. On a mismatch the destinations hold the bad bytes and
        :class:`CorruptExpertError` is raised: the caller must not use them."""
        entry = self.manifest.entry(key)
        path = self.store_dir / entry.file
        fd = self._fd(entry.file)
        assert self.can_read_into(*parts), "every part of an expert, as the store holds it"
        for (start, end), out in zip(entry.ranges, parts, strict=True):
            assert out.nbytes == end - start, "a slot of the store's layout"
            _read_exactly(fd, path, out.view(torch.uint8).reshape(-1).numpy(), start)
        if self.verify == "always" or (self.verify == "first" and key not in self._verified):
            if xxh3_of(*(_bytes_of(out) for out in parts)) != entry.xxh3:
                raise CorruptExpertError(str(path), key.layer, key.expert)
            self._verified.add(key)

    def release(self, key: ExpertKey) -> None:
        """Drop an expert's mapped pages from this process once they have been copied (see MappedFile.release)."""
        entry = self.manifest.entry(key)
        mapped = self._mapped(entry.file)
        for byte_range in entry.ranges:
            mapped.release(*byte_range)

    def _check_dtypes(self, relative: str) -> None:
        """The expert file's own header agrees with the manifest's scheme (weights' dtype, scales
        present): bytes of one scheme are never read as another's."""
        infos = read_header(self.store_dir / relative)
        for name, info in infos.items():
            expected = torch.float32 if name.endswith("_scale") else self.dtype
            if info.dtype != expected:
                raise StoreError(
                    f"{self.store_dir / relative} holds {name} as {DTYPE_NAMES[info.dtype]} but the manifest "
                    f"says experts are {self.manifest.expert_scheme!r} ({DTYPE_NAMES[self.dtype]}); "
                    "re-run `taer shard`"
                )
        if self.scheme.is_quantized != any(name.endswith("_scale") for name in infos):
            raise StoreError(
                f"{self.store_dir / relative} {'lacks' if self.scheme.is_quantized else 'has'} scale tensors "
                f"but the manifest says experts are {self.manifest.expert_scheme!r}; re-run `taer shard`"
            )

    def _mapped(self, relative: str) -> MappedFile:
        if relative not in self._maps:
            self._maps[relative] = MappedFile(self.store_dir / relative)
        return self._maps[relative]

    def _fd(self, relative: str) -> int:
        if relative not in self._fds:
            self._fds[relative] = os.open(self.store_dir / relative, os.O_RDONLY)
        return self._fds[relative]

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _read_exactly(fd: int, path: Path, out, offset: int) -> None:
    """Fill the byte array ``out`` from ``offset`` of the file (a read may return less than asked)."""
    view, done = memoryview(out), 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise StoreError(
                f"{path} is truncated: needs {offset + len(view)} bytes, ends at {offset + done}"
            )
        done += count


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())


def _view(raw: memoryview, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only ever copy from it
        return torch.frombuffer(raw, dtype=dtype).view(shape)


@dataclass
class VerifyReport:
    """What ``verify_store`` found: every problem names the file (and the expert where one is)."""

    files_checked: int = 0
    experts_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(store_dir: Path) -> VerifyReport:
    """Check every file's sha256 and every expert's xxh3 against the manifest."""
    store = ExpertStore(store_dir, verify="always")
    report = VerifyReport()
    manifest = store.manifest
    corrupt_files = set()
    files = [*manifest.dense_files, *manifest.expert_files]
    for entry in tqdm(files, desc="verifying files", unit="file"):
        path = store.store_dir / entry.path
        report.files_checked += 1
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            corrupt_files.add(entry.path)
            report.problems.append(f"{path}: size or sha256 does not match the manifest")
    for key in tqdm(sorted(manifest.experts), desc="verifying experts", unit="expert"):
        entry = manifest.experts[key]
        report.experts_checked += 1
        try:
            store.expert(key)
        except CorruptExpertError:
            report.problems.append(f"{store.store_dir / entry.file}: expert ({key}) checksum mismatch")
        except StoreError as error:
            report.problems.append(f"{store.store_dir / entry.file}: expert ({key}): {error}")
    store.close()
    return report
