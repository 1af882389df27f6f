"""A Hugging Face checkpoint directory as a map from tensor name to the file that holds it.

After TGI's ``Weights``: files are opened lazily with ``safe_open``; a name stored twice is an
error; a shard named by ``model.safetensors.index.json`` but absent is an error that names it.
Only safetensors is read: a pickle-only (``.bin``) checkpoint is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from expert_store.errors import CheckpointError
from expert_store.safetensors_file import read_header

INDEX_FILE = "model.safetensors.index.json"


class CheckpointFiles:
    """Tensor name -> safetensors file for one checkpoint directory."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        check_checkpoint_dir(self.model_dir)
        self.routing = self._build_routing()
        self._handles: dict[Path, object] = {}

    def _build_routing(self) -> dict[str, Path]:
        index = self.model_dir / INDEX_FILE
        if index.exists():
            return self._routing_from_index(index)
        routing: dict[str, Path] = {}
        for path in sorted(self.model_dir.glob("*.safetensors")):
            for name in read_header(path):
                if name in routing:
                    raise CheckpointError(
                        f"tensor {name} is stored twice: in {routing[name].name} and {path.name}"
                    )
                routing[name] = path
        return routing

    def _routing_from_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index ({error})") from error
        routing = {name: self.model_dir / file for name, file in weight_map.items()}
        missing = sorted({path.name for path in routing.values() if not path.exists()})
        if missing:
            raise CheckpointError(
                f"{INDEX_FILE} lists shard(s) missing from {self.model_dir}: {', '.join(missing)}; "
                "download the complete checkpoint"
            )
        return routing

    @property
    def names(self) -> list[str]:
        return list(self.routing)

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read from its file now (one tensor's worth of memory)."""
        return self._handle(name).get_tensor(name)

    def get_rows(self, name: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of a stacked tensor, reading only that slice."""
        return self._handle(name).get_slice(name)[index]

    def _handle(self, name: str):
        try:
            path = self.routing[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in the checkpoint at {self.model_dir}") from None
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def close(self) -> None:
        self._handles.clear()


def check_checkpoint_dir(model_dir: Path) -> None:
    """Refuse anything that is not a safetensors Hugging Face checkpoint directory."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory; pass a Hugging Face checkpoint directory")
    if not (model_dir / "config.json").exists():
        raise CheckpointError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint directory")
    if not any(model_dir.glob("*.safetensors")) and not (model_dir / INDEX_FILE).exists():
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise CheckpointError(
                f"{model_dir} holds only pickle weights (.bin/.pt), which taer never loads; convert the "
                "checkpoint to safetensors first (for example save_pretrained with safe_serialization)"
            )
        raise CheckpointError(f"{model_dir} has no *.safetensors weights")
