"""`taer quickstart` (what `make run` calls): it serves with `taer serve`'s own arguments."""

from __future__ import annotations

import argparse

import demo.prepare
from demo.prepare import PreparedDemo
from server.cli import quickstart, serve


def _serve_defaults() -> dict:
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    return vars(parser.parse_args(["serve", "store"]))


def test_quickstart_serves_with_every_serve_option(tmp_path, monkeypatch):
    seen = []
    prepared = PreparedDemo(
        tmp_path / "store", tmp_path / "patterns", tmp_path / "model", tmp_path / "t.yaml"
    )
    monkeypatch.setattr(demo.prepare, "prepare_demo", lambda paths: prepared)
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
