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
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of the store with its size and sha256, checked by ``taer verify``."""

    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ExpertEntry:
    """Where one expert's two tensors lie: absolute byte ranges in ``file``, and their xxh3-64.

    ``gate_up_proj`` is [2 * intermediate, hidden] (gate rows first), ``down_proj`` is
    [hidden, intermediate], as transformers 5 stacks them.
    """

    file: str
    gate_up: tuple[int, int]
    down: tuple[int, int]
    xxh3: str

    @property
    def nbytes(self) -> int:
        return (self.gate_up[1] - self.gate_up[0]) + (self.down[1] - self.down[0])


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
    format_version: int = FORMAT_VERSION
    extra_files: list[str] = field(default_factory=list)

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
            experts.setdefault(str(key.layer), []).append(
                {
                    "expert": key.expert,
                    "file": entry.file,
                    "gate_up": list(entry.gate_up),
                    "down": list(entry.down),
                    "xxh3": entry.xxh3,
                }
            )
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "family": self.family,
            "dtype": self.dtype,
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
                item["file"], tuple(item["gate_up"]), tuple(item["down"]), item["xxh3"]
            )
            for layer, items in data["experts"].items()
            for item in items
        }
        return cls(
            family=data["family"],
            dtype=data["dtype"],
            layout=MoELayout.from_json(data["layout"]),
            dense_files=[FileEntry(**entry) for entry in data["dense_files"]],
            expert_files=[FileEntry(**entry) for entry in data["expert_files"]],
            experts=experts,
            fingerprint=data["fingerprint"],
            source=data.get("source", ""),
            created=data.get("created", ""),
            format_version=data["format_version"],
            extra_files=data.get("extra_files", []),
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
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} is format {data.get('format')!r} version {data.get('format_version')!r}; this taer "
                f"reads {FORMAT!r} version {FORMAT_VERSION}: re-run `taer shard`"
            )
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"{path} is malformed ({error!r}); re-run `taer shard`") from error
