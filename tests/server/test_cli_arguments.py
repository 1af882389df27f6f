"""The flags subcommands share: ``--encoder`` parses alike everywhere, and a command whose flags are an
options dataclass gets exactly the values parsed."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from retrieval.calibrate import CalibrationOptions
from server.cli import build_parser
from server.cli.arguments import dataclass_from_args


def test_calibrate_flags_become_its_options() -> None:
    args = build_parser().parse_args(
        [
            "calibrate",
            "store",
            "tasks.yaml",
            "--out",
            "p",
            "--batch-size",
            "4",
            "--ka",
            "2",
            "--stream-layers",
        ]
    )
    options = dataclass_from_args(CalibrationOptions, args)
    assert options == CalibrationOptions(batch_size=4, ka=2, stream_layers=True)


def test_a_field_without_its_flag_is_an_error() -> None:
    @dataclass
    class Options:
        batch_size: int
        not_a_flag: int = 0

    with pytest.raises(AttributeError, match="not_a_flag"):
        dataclass_from_args(Options, argparse.Namespace(batch_size=1))


@pytest.mark.parametrize("command", ["calibrate", "discover"])
def test_encoder_is_a_name_or_a_directory(command: str) -> None:
    parser = build_parser()
    positional = ["store", "tasks.yaml"] if command == "calibrate" else ["log.jsonl"]
    base = [command, *positional, "--out", "out"]
    assert parser.parse_args(base).encoder is None
    assert parser.parse_args([*base, "--encoder", "mpnet"]).encoder == Path("mpnet")
