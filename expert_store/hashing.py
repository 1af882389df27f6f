"""Checksums: sha256 per store file (``taer verify``), xxh3-64 per expert (fast enough to check on load)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import xxhash


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def xxh3_of(*buffers) -> str:
    """xxh3-64 of the concatenation of ``buffers`` (anything exposing the buffer protocol)."""
    digest = xxhash.xxh3_64()
    for buffer in buffers:
        digest.update(buffer)
    return digest.hexdigest()
