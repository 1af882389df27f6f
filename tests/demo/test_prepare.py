"""demo.prepare: the one function that readies the demo for quickstart, the container and the
benchmarks; an index of an older format is rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

from demo.prepare import DemoPaths, index_is_current
from retrieval.index_io import FORMAT_VERSION, METADATA_FILE


def test_the_data_layout_puts_demo_store_and_patterns_side_by_side(tmp_path):
    paths = DemoPaths.under(tmp_path)
    assert (paths.demo, paths.store, paths.patterns) == (
        tmp_path / "demo",
        tmp_path / "store",
        tmp_path / "patterns",
    )


def _write_index_metadata(directory: Path, version: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / METADATA_FILE).write_text(json.dumps({"format_version": version}))
    return directory


def test_an_index_of_an_older_format_is_rebuilt(tmp_path):
    assert not index_is_current(tmp_path / "missing")
    assert not index_is_current(_write_index_metadata(tmp_path / "old", FORMAT_VERSION - 1))
    assert index_is_current(_write_index_metadata(tmp_path / "new", FORMAT_VERSION))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / METADATA_FILE).write_text("{not json")
    assert not index_is_current(tmp_path / "bad")


def test_taer_demo_prepare_moves_each_output_with_its_flag(tmp_path, monkeypatch):
    import demo.prepare
    from server.cli import main

    seen = []
    monkeypatch.setattr(
        demo.prepare,
        "prepare_demo",
        lambda paths, encoder_path: (
            seen.append((paths, encoder_path))
            or demo.prepare.PreparedDemo(paths.store, paths.patterns, paths.demo, paths.demo)
        ),
    )
    argv = ["demo", "prepare", "--data", str(tmp_path), "--store", str(tmp_path / "s"), "--encoder", "enc"]
    assert main(argv) == 0
    assert seen == [(DemoPaths(tmp_path / "demo", tmp_path / "s", tmp_path / "patterns"), Path("enc"))]
