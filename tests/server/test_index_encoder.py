"""`taer serve` without ``--encoder`` queries an index with the encoder it records, when taer knows
that encoder by name; otherwise the default, and the index refuses a mismatch naming its encoder."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_server import tiny_pipeline

from expert_store.errors import RetrievalIndexError
from retrieval.build import INDEX_SUBDIR
from retrieval.encoder_sources import MINILM_NAME, MPNET_NAME
from retrieval.index_io import METADATA_FILE
from server.loading import ServeConfig, index_encoder, load_routing_parts


def _index_recording(tmp_path, name: str):
    store, patterns = tiny_pipeline()
    copy = tmp_path / "patterns"
    shutil.copytree(patterns, copy)
    metadata_file = copy / INDEX_SUBDIR / METADATA_FILE
    metadata = json.loads(metadata_file.read_text())
    _, dim, digest = metadata["encoder"].rsplit(":", 2)
    metadata["encoder"] = f"{name}:{dim}:{digest}"
    metadata_file.write_text(json.dumps(metadata))
    return store, copy


def test_the_recorded_named_encoder_is_chosen(tmp_path):
    _, patterns = tiny_pipeline()
    assert index_encoder(patterns / INDEX_SUBDIR) == MINILM_NAME
    _, copy = _index_recording(tmp_path, MPNET_NAME)
    assert index_encoder(copy / INDEX_SUBDIR) == MPNET_NAME
    _, custom = _index_recording(tmp_path / "custom", "my-own-encoder")
    assert index_encoder(custom / INDEX_SUBDIR) is None  # a directory: pass it again
    assert index_encoder(tmp_path / "nothing") is None


def test_an_index_of_an_unknown_directory_encoder_is_refused_by_name(tmp_path):
    store, copy = _index_recording(tmp_path, "my-own-encoder")
    metadata_file = copy / INDEX_SUBDIR / METADATA_FILE
    metadata = json.loads(metadata_file.read_text())
    metadata["encoder"] = "my-own-encoder:384:0000"  # another model's vectors
    metadata_file.write_text(json.dumps(metadata))
    with pytest.raises(RetrievalIndexError, match="my-own-encoder"):
        load_routing_parts(ServeConfig(store, copy, keep=0.5))
