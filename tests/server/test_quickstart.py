"""`taer quickstart` (what `make run` calls): it serves with `taer serve`'s own arguments, and it
rebuilds an index of an older format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrieval.index_io import FORMAT_VERSION, METADATA_FILE
from server.cli import quickstart, serve


def _serve_defaults() -> dict:
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    return vars(parser.parse_args(["serve", "store"]))


def test_quickstart_serves_with_every_serve_option(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(quickstart, "prepare", lambda data: (tmp_path / "store", tmp_path / "patterns"))
    monkeypatch.setattr(serve, "run", lambda args: seen.append(args) or 0)
    args = argparse.Namespace(
        data=tmp_path, keep=0.25, mode="exact", host="127.0.0.1", port=8123, no_serve=False
    )
    assert quickstart.run(args) == 0
    (served,) = seen
    # Every option `taer serve` has is there, with its default unless the demo sets it.
    assert set(vars(served)) == set(_serve_defaults())
    assert (served.store_dir, served.patterns) == (tmp_path / "store", tmp_path / "patterns")
    assert (served.keep, served.mode, served.port, served.device) == (0.25, "exact", 8123, "cpu")
    assert served.served_model_name == "demo" and served.encoder_dtype == "auto"


def _write_index_metadata(directory: Path, version: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / METADATA_FILE).write_text(json.dumps({"format_version": version}))
    return directory


def test_an_index_of_an_older_format_is_rebuilt(tmp_path):
    assert not quickstart._index_is_current(tmp_path / "missing")
    assert not quickstart._index_is_current(_write_index_metadata(tmp_path / "old", FORMAT_VERSION - 1))
    assert quickstart._index_is_current(_write_index_metadata(tmp_path / "new", FORMAT_VERSION))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / METADATA_FILE).write_text("{not json")
    assert not quickstart._index_is_current(tmp_path / "bad")
