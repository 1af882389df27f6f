from __future__ import annotations

import pytest
from tiny_models import save_tiny

from expert_store.shard import shard_checkpoint


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    """family -> (reference model, store dir), built once per session."""
    cache = {}

    def get(family: str, fused: bool = False):
        if (family, fused) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{'fused' if fused else 'split'}")
            model = save_tiny(family, root / "ckpt", fused=fused)
            shard_checkpoint(root / "ckpt", root / "store")
            cache[family, fused] = (model, root / "store", root / "ckpt")
        return cache[family, fused]

    return get
