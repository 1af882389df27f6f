from __future__ import annotations

import pytest
from tiny_models import save_tiny

from expert_store.shard import shard_checkpoint


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    """(family, fused, expert dtype) -> (reference model, store dir, checkpoint dir), built once per
    session."""
    cache = {}

    def get(family: str, fused: bool = False, expert_dtype: str = "source"):
        if (family, fused, expert_dtype) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{'fused' if fused else 'split'}-{expert_dtype}")
            model = save_tiny(family, root / "ckpt", fused=fused)
            shard_checkpoint(root / "ckpt", root / "store", expert_dtype=expert_dtype)
            cache[family, fused, expert_dtype] = (model, root / "store", root / "ckpt")
        return cache[family, fused, expert_dtype]

    return get
