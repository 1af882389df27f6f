"""The sentence encoder: the packaged MiniLM loaded offline, unit vectors, truncation, fingerprints."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from expert_store.errors import EncoderError
from retrieval.encoder import (
    DEFAULT_MODEL_NAME,
    Encoder,
    EncoderFingerprint,
    cpu_has_native_bf16,
    fingerprint_digest,
    resolve_encoder_dtype,
)
from retrieval.encoder_sources import default_model_dir


@pytest.fixture(scope="module")
def encoder() -> Iterator[Encoder]:
    # On a small shared CPU one torch thread is several times faster than OpenMP threads that
    # contend with other processes; restore the setting for the tests that follow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # float32, so that the exactness checks below do not depend on this CPU's bfloat16 support.
    yield Encoder.load(dtype="float32")
    torch.set_num_threads(threads)


def test_default_encoder_is_packaged_minilm(encoder):
    assert encoder.name == DEFAULT_MODEL_NAME
    assert encoder.dim == 384
    assert encoder.max_length == 256
    assert str(encoder.fingerprint).startswith("all-MiniLM-L6-v2:384:")


def test_encode_returns_unit_float32_rows(encoder):
    vectors = encoder.encode(["What is 2 plus 2?", "Reverse the word 'cat'.", "Bonjour"])
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_similar_texts_are_closer_than_unrelated_ones(encoder):
    a, b, c = encoder.encode(["What is 12 plus 7?", "Compute 45 plus 19.", "Translate 'cat' into French."])
    assert a @ b > a @ c + 0.1


def test_encode_empty_list(encoder):
    assert encoder.encode([]).shape == (0, 384)


def test_batch_equals_single(encoder):
    texts = ["short", "a somewhat longer sentence about adding numbers together", "Reverse 'stone'."]
    batch = encoder.encode(texts)  # [3, D]
    singles = np.concatenate([encoder.encode([text]) for text in texts])  # [3, D]
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_direct_forward_equals_sentence_transformers_encode(encoder):
    texts = ["Sort 4312.", "a much longer request about reversing the letters of a word", "Bonjour", "x"] * 3
    ours = encoder.encode(texts)  # [12, D], order restored after the length sort
    reference = encoder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_bfloat16_encoder_stays_close_to_float32(encoder):
    texts = ["What is 12 plus 7?", "Reverse the word 'cat'.", "Write a haiku about autumn."]
    half = Encoder.load(dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and encoder.dtype == torch.float32
    assert half.fingerprint == encoder.fingerprint  # same weights, same index
    cosines = (half.encode(texts) * encoder.encode(texts)).sum(axis=1)
    assert cosines.min() > 0.999


def test_encoder_dtype_resolution():
    assert resolve_encoder_dtype("float32", "cpu") == torch.float32
    assert resolve_encoder_dtype("auto", "cuda:0") == torch.bfloat16
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_encoder_dtype("auto", "cpu") == expected
    with pytest.raises(EncoderError, match="unknown encoder dtype 'int4'"):
        Encoder.load(dtype="int4")


def test_long_text_is_truncated_not_rejected(encoder):
    head = "add the numbers " * 200  # far past 256 tokens
    vectors = encoder.encode([head, head + "reverse the string backwards " * 200])  # [2, D]
    assert vectors.shape == (2, 384)
    # Everything past the maximum length is dropped, so the tails make no difference.
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


def test_fingerprint_is_stable_and_parses(encoder):
    again = EncoderFingerprint.parse(str(encoder.fingerprint))
    assert again == encoder.fingerprint
    assert fingerprint_digest(default_model_dir()) == encoder.fingerprint.digest


def test_fingerprint_follows_content_not_directory_name(tmp_path, encoder):
    source = default_model_dir()
    copy = tmp_path / "renamed-model"
    copy.mkdir()
    for path in source.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    assert fingerprint_digest(copy) == encoder.fingerprint.digest
    renamed = EncoderFingerprint("renamed-model", 384, fingerprint_digest(copy))
    assert renamed.matches(encoder.fingerprint)

    (copy / "README.md").unlink()
    (copy / "README.md").write_text("edited documentation")
    assert fingerprint_digest(copy) == encoder.fingerprint.digest  # documentation does not count

    (copy / "1_Pooling" / "config.json").unlink()
    shutil.copy(source / "1_Pooling" / "config.json", copy / "1_Pooling" / "config.json")
    with (copy / "1_Pooling" / "config.json").open("a") as file:
        file.write("\n")
    assert fingerprint_digest(copy) != encoder.fingerprint.digest


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-encoder"
    with pytest.raises(EncoderError, match="no-such-encoder"):
        Encoder.load(missing)


def test_directory_that_is_not_a_model_names_it(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(EncoderError, match=re.escape(str(tmp_path))):
        Encoder.load(tmp_path)


def test_broken_model_directory_is_an_encoder_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EncoderError, match=re.escape(str(tmp_path))):
        Encoder.load(tmp_path)
