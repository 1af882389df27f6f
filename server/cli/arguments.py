"""Flags and conversions that more than one subcommand shares."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENCODERS = "minilm (default), mpnet, or a sentence-transformers model directory"
"""What ``--encoder`` accepts (see :mod:`retrieval.encoder_sources`), as every help text says it."""


def add_encoder_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--encoder NAME_OR_DIR`` (default None: the packaged MiniLM); ``help_text`` says what the
    command does with it."""
    parser.add_argument("--encoder", type=Path, default=None, metavar="NAME_OR_DIR", help=help_text)


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """``cls`` with every field taken from the parsed flag of the same name, for a command whose flags
    are an options dataclass (as vLLM's ``EngineArgs.from_cli_args``). A field without a flag is an
    ``AttributeError``: a new option needs its flag."""
    values: dict[str, Any] = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}
    return cls(**values)
