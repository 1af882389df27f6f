"""The store's ``manifest.json``: what every file holds, where each expert's bytes are, checksums."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from expert_store.errors import StoreError
from expert_store.keys import ExpertKey
from expert_store.skeleton import MoELayout

MANIFEST_FILE = "manifest.json"
FORMAT = "taer-store"
# Version 1: experts stored in the store's dtype. Version 2: 8-bit experts with scales (``expert_scheme``),
# written only for such stores, so a taer that reads version 1 alone refuses them instead of
# misreading their bytes. This taer reads both.
FORMAT_VERSION = 1
QUANTIZED_FORMAT_VERSION = 2
_READABLE_VERSIONS = (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of the store with its size and sha256, checked by ``taer verify``."""

    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ExpertEntry:
    """Where one expert's tensors lie: absolute byte ranges in ``file``, and their xxh3-64.

    ``gate_up_proj`` is [2 * intermediate, hidden] (gate rows first), ``down_proj`` is
    [hidden, intermediate], as transformers 5 stacks them. An 8-bit ``scheme`` adds their float32
    scales, [2 * intermediate] and [hidden]; the checksum covers the weights, then the scales.
    """

    file: str
    gate_up: tuple[int, int]
    down: tuple[int, int]
    xxh3: str
    scheme: str = "none"
    gate_up_scale: tuple[int, int] | None = None
    down_scale: tuple[int, int] | None = None

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The byte ranges in checksum order: gate_up, down, then the scales if any."""
        scales = (self.gate_up_scale, self.down_scale)
        return (self.gate_up, self.down, *(r for r in scales if r is not None))

    @property
    def nbytes(self) -> int:
        return sum(end - start for start, end in self.ranges)


@dataclass(slots=True)
class Manifest:
    family: str
    dtype: str
    layout: MoELayout
    dense_files: list[FileEntry]
    expert_files: list[FileEntry]
    experts: dict[ExpertKey, ExpertEntry]
    fingerprint: str
    source: str = ""
    created: str = ""
    extra_files: list[str] = field(default_factory=list)
    # How every expert is stored (expert_store/quant.py); ``dtype`` is then what they dequantize to.
    expert_scheme: str = "none"

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION if self.expert_scheme == "none" else QUANTIZED_FORMAT_VERSION

    @property
    def bytes_per_expert(self) -> int:
        return next(iter(self.experts.values())).nbytes

    @property
    def dense_bytes(self) -> int:
        return sum(entry.bytes for entry in self.dense_files)

    @property
    def expert_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.experts.values())

    def entry(self, key: ExpertKey) -> ExpertEntry:
        try:
            return self.experts[key]
        except KeyError:
            raise StoreError(f"the store has no expert ({key})") from None

    def to_json(self) -> dict:
        experts: dict[str, list] = {}
        for key in sorted(self.experts):
            entry = self.experts[key]
            item = {
                "expert": key.expert,
                "file": entry.file,
                "gate_up": list(entry.gate_up),
                "down": list(entry.down),
                "xxh3": entry.xxh3,
            }
            if entry.scheme != "none":
                item |= {
                    "scheme": entry.scheme,
                    "gate_up_scale": list(entry.gate_up_scale),
                    "down_scale": list(entry.down_scale),
                }
            experts.setdefault(str(key.layer), []).append(item)
        scheme = {"expert_scheme": self.expert_scheme} if self.expert_scheme != "none" else {}
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "family": self.family,
            "dtype": self.dtype,
            **scheme,
            "layout": self.layout.to_json(),
            "fingerprint": self.fingerprint,
            "source": self.source,
            "created": self.created,
            "dense_files": [asdict(entry) for entry in self.dense_files],
            "expert_files": [asdict(entry) for entry in self.expert_files],
            "extra_files": self.extra_files,
            "experts": experts,
        }

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        experts = {
            ExpertKey(int(layer), item["expert"]): ExpertEntry(
                item["file"],
                tuple(item["gate_up"]),
                tuple(item["down"]),
                item["xxh3"],
                item.get("scheme", "none"),
                _range(item.get("gate_up_scale")),
                _range(item.get("down_scale")),
            )
            for layer, items in data["experts"].items()
            for item in items
        }
        manifest = cls(
            family=data["family"],
            dtype=data["dtype"],
            layout=MoELayout.from_json(data["layout"]),
            dense_files=[FileEntry(**entry) for entry in data["dense_files"]],
            expert_files=[FileEntry(**entry) for entry in data["expert_files"]],
            experts=experts,
            fingerprint=data["fingerprint"],
            source=data.get("source", ""),
            created=data.get("created", ""),
            extra_files=data.get("extra_files", []),
            expert_scheme=data.get("expert_scheme", "none"),
        )
        if manifest.format_version != data["format_version"]:
            raise ValueError(
                f"format version {data['format_version']} with expert scheme {manifest.expert_scheme!r}"
            )
        manifest.check_schemes()
        return manifest

    def check_schemes(self) -> None:
        """Every expert in the store's scheme, with scales exactly when the scheme has them: a store
        of one scheme is never read as another."""
        quantized = self.expert_scheme != "none"
        for key, entry in self.experts.items():
            has_scales = entry.gate_up_scale is not None and entry.down_scale is not None
            if entry.scheme != self.expert_scheme or has_scales != quantized:
                raise ValueError(
                    f"expert ({key}) is stored as {entry.scheme!r} "
                    f"({'with' if has_scales else 'without'} scales) in a store of {self.expert_scheme!r}"
                )

    def save(self, store_dir: Path) -> None:
        (store_dir / MANIFEST_FILE).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, store_dir: Path) -> Manifest:
        path = Path(store_dir) / MANIFEST_FILE
        if not Path(store_dir).is_dir():
            raise StoreError(
                f"{store_dir} is not a directory; create a store with `taer shard MODEL_DIR {store_dir}`"
            )
        if not path.exists():
            raise StoreError(
                f"{store_dir} is not a taer store (no {MANIFEST_FILE}); create one with `taer shard`"
            )
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            raise StoreError(f"{path} is not valid JSON ({error}); re-run `taer shard`") from error
        if data.get("format") != FORMAT or data.get("format_version") not in _READABLE_VERSIONS:
            raise StoreError(
                f"{path} is format {data.get('format')!r} version {data.get('format_version')!r}; this taer "
                f"reads {FORMAT!r} versions {', '.join(map(str, _READABLE_VERSIONS))}: re-run `taer shard`"
            )
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"{path} is malformed ({error!r}); re-run `taer shard`") from error


def _range(value: list[int] | None) -> tuple[int, int] | None:
    return tuple(value) if value is not None else None
