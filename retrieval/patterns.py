"""Task patterns on disk: every task's tables in one safetensors file, the rest in ``patterns.json``.

A patterns directory holds

- ``patterns.safetensors``: ``{task}/tcess``, ``{task}/frequency``, ``{task}/mean_prob`` ([layers,
  experts] float32) and ``{task}/thresholds`` ([layers] float32) for every task and ``general``;
- ``patterns.json``: format version, the model fingerprint, tasks, token counts, scoring, thresholds,
  ka/top_k, always-keep experts, super experts and the creation time (UTC, ISO 8601).

Patterns belong to one model: loading checks the fingerprint the caller computed from the store.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from expert_store.errors import PatternError, TasksFileError, UnknownTaskError
from retrieval.selection import AlwaysKeep, Budget, Selection, select_by
from retrieval.tasks_file import GENERAL, check_task_name
from retrieval.tcess import SCORINGS, SuperExpert, TableName, TaskStats

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_FILE = "patterns.safetensors"
META_FILE = "patterns.json"
_TENSOR_NAMES = ("tcess", "frequency", "mean_prob", "thresholds")
_SHARED_SETTINGS = ("num_layers", "num_experts", "top_k", "ka", "scoring", "threshold_mode")


@dataclass(frozen=True, eq=False)
class Pattern:
    """One task's pattern: its tables, the super experts its calibration found, free-form metadata."""

    task: str
    stats: TaskStats
    super_experts: tuple[SuperExpert, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class PatternSet:
    """Every task's pattern plus ``general`` (TCESS pooled over all tasks), for one model.

    ``always_keep`` holds the experts retained in every pattern (user-marked); ``required_experts()``
    adds every pattern's super experts to it.
    """

    fingerprint: str
    patterns: Mapping[str, Pattern]
    always_keep: Mapping[int, frozenset[int]] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if GENERAL not in self.patterns:
            raise PatternError(f"a pattern set needs a {GENERAL!r} pattern (TCESS pooled over all tasks)")
        for name, pattern in self.patterns.items():
            if name != pattern.task:
                raise PatternError(f"pattern stored as {name!r} is for task {pattern.task!r}")
            if name != GENERAL:
                _check_name(name)
        reference = _settings(self.patterns[GENERAL].stats)
        for name, pattern in self.patterns.items():
            if _settings(pattern.stats) != reference:
                raise PatternError(
                    f"pattern {name!r} has settings {_settings(pattern.stats)}, not {reference}"
                )
        self.always_keep = {
            int(layer): frozenset(int(e) for e in ids) for layer, ids in self.always_keep.items()
        }

    @property
    def tasks(self) -> list[str]:
        """The task names, without ``general``."""
        return [name for name in self.patterns if name != GENERAL]

    @property
    def general(self) -> Pattern:
        return self.patterns[GENERAL]

    def __contains__(self, task: object) -> bool:
        return task in self.patterns

    def __iter__(self) -> Iterator[Pattern]:
        return iter(self.patterns.values())

    def get(self, task: str) -> Pattern:
        """The pattern of ``task`` (or ``general``); UnknownTaskError lists the known ones."""
        try:
            return self.patterns[task]
        except KeyError:
            known = ", ".join([*self.tasks, GENERAL])
            raise UnknownTaskError(f"no pattern for task {task!r}; known tasks: {known}") from None

    def required_experts(self) -> dict[int, frozenset[int]]:
        """Experts every retained set must hold: ``always_keep`` plus every pattern's super experts."""
        required = {layer: set(ids) for layer, ids in self.always_keep.items()}
        for pattern in self:
            for expert in pattern.super_experts:
                required.setdefault(expert.layer, set()).add(expert.expert)
        return {layer: frozenset(ids) for layer, ids in sorted(required.items())}

    def select(
        self,
        task: str,
        budget: Budget,
        *,
        adaptive: bool = False,
        score: TableName = "tcess",
        always_keep: AlwaysKeep | None = None,
    ) -> Selection:
        """The retained set of ``task`` under ``budget``, holding ``required_experts()`` and ``always_keep``.

        Experts tied on ``score`` are ordered by the router's mean probability (see ``select_by``).
        """
        keep = {layer: set(ids) for layer, ids in self.required_experts().items()}
        for layer, ids in (always_keep or {}).items():
            keep.setdefault(layer, set()).update(ids)
        return select_by(self.get(task).stats, budget, score=score, always_keep=keep, adaptive=adaptive)

    def save(self, directory: str | Path) -> None:
        """Write ``patterns.safetensors`` and ``patterns.json`` into ``directory`` (created if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{name}/{tensor}": getattr(pattern.stats, tensor).detach().cpu().contiguous().clone()
            for name, pattern in self.patterns.items()
            for tensor in _TENSOR_NAMES
        }
        # Write both under temporary names first so that a crash never leaves a half-written pair.
        save_file(
            tensors, directory / f".{TENSORS_FILE}.tmp", metadata={"format_version": str(FORMAT_VERSION)}
        )
        (directory / f".{META_FILE}.tmp").write_text(
            json.dumps(self._meta(), indent=2) + "\n", encoding="utf-8"
        )
        os.replace(directory / f".{TENSORS_FILE}.tmp", directory / TENSORS_FILE)
        os.replace(directory / f".{META_FILE}.tmp", directory / META_FILE)
        logger.info("wrote %d patterns to %s", len(self.patterns), directory)

    @classmethod
    def load(cls, directory: str | Path, expected_fingerprint: str | None = None) -> PatternSet:
        """Read a patterns directory; refuse one made for another model (fingerprint mismatch)."""
        directory = Path(directory)
        meta = _read_meta(directory)
        if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
            raise PatternError(
                f"patterns in {directory} were made for model {meta['fingerprint']!r}, not for this model "
                f"{expected_fingerprint!r}; re-run `taer calibrate` for this model"
            )
        tensors = _read_tensors(directory)
        try:
            patterns = {
                name: _pattern(name, entry, meta, tensors) for name, entry in meta["patterns"].items()
            }
            return cls(
                fingerprint=meta["fingerprint"],
                patterns=patterns,
                always_keep={int(layer): frozenset(ids) for layer, ids in meta["always_keep"].items()},
                created=meta["created"],
                metadata=meta["metadata"],
            )
        except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as error:
            raise PatternError(
                f"{directory / META_FILE} is malformed ({error!r}); re-run `taer calibrate`"
            ) from None

    def _meta(self) -> dict[str, Any]:
        general = self.general.stats
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "created": self.created,
            **{name: value for name, value in zip(_SHARED_SETTINGS, _settings(general), strict=True)},
            "tasks": self.tasks,
            "always_keep": {str(layer): sorted(ids) for layer, ids in sorted(self.always_keep.items())},
            "patterns": {
                name: {
                    "num_tokens": pattern.stats.num_tokens,
                    "thresholds": pattern.stats.thresholds.tolist(),
                    "super_experts": [expert.to_json() for expert in pattern.super_experts],
                    "metadata": dict(pattern.metadata),
                }
                for name, pattern in self.patterns.items()
            },
            "metadata": dict(self.metadata),
        }


def _settings(stats: TaskStats) -> tuple:
    return tuple(getattr(stats, name) for name in _SHARED_SETTINGS)


def _check_name(name: str) -> None:
    try:
        check_task_name(name)
    except TasksFileError as error:
        raise PatternError(str(error)) from None


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not path.is_file():
        raise PatternError(f"no patterns at {directory} ({META_FILE} missing); run `taer calibrate` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PatternError(f"{path} is not valid JSON ({error}); re-run `taer calibrate`") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise PatternError(f"{path} has format version {version!r}, this taer reads {FORMAT_VERSION}")
    if not isinstance(meta.get("fingerprint"), str):
        raise PatternError(f"{path} has no model fingerprint; re-run `taer calibrate`")
    return meta


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / TENSORS_FILE
    if not path.is_file():
        raise PatternError(f"{path} missing; re-run `taer calibrate`")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise PatternError(f"{path} cannot be read ({error}); re-run `taer calibrate`") from None


def _pattern(name: str, entry: dict, meta: dict, tensors: Mapping[str, torch.Tensor]) -> Pattern:
    shapes = {t: (meta["num_layers"], meta["num_experts"]) for t in _TENSOR_NAMES} | {
        "thresholds": (meta["num_layers"],)
    }
    for tensor, shape in shapes.items():
        key = f"{name}/{tensor}"
        if key not in tensors:
            raise PatternError(f"{TENSORS_FILE} lacks {key}; re-run `taer calibrate`")
        if tuple(tensors[key].shape) != shape or tensors[key].dtype != torch.float32:
            raise PatternError(
                f"{TENSORS_FILE}: {key} is {tensors[key].dtype} {tuple(tensors[key].shape)}, not float32 {shape}"
            )
    if meta["scoring"] not in SCORINGS:
        raise PatternError(f"{META_FILE}: unknown scoring {meta['scoring']!r}")
    stats = TaskStats(
        **{t: tensors[f"{name}/{t}"] for t in _TENSOR_NAMES},
        num_tokens=int(entry["num_tokens"]),
        top_k=int(meta["top_k"]),
        ka=int(meta["ka"]),
        scoring=meta["scoring"],
        threshold_mode=meta["threshold_mode"],
    )
    super_experts = tuple(SuperExpert.from_json(e) for e in entry["super_experts"])
    return Pattern(task=name, stats=stats, super_experts=super_experts, metadata=entry["metadata"])


def build_pattern_set(
    fingerprint: str,
    task_stats: Mapping[str, TaskStats],
    general: TaskStats,
    *,
    super_experts: Mapping[str, Sequence[SuperExpert]] | None = None,
    always_keep: AlwaysKeep | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> PatternSet:
    """Convenience for the calibration driver: wrap finalized stats (and super experts per task)."""
    if GENERAL in task_stats:
        raise PatternError(f"{GENERAL!r} is the pooled pattern; pass it as `general`, not as a task")
    super_experts = super_experts or {}
    patterns = {
        name: Pattern(name, stats, tuple(super_experts.get(name, ())))
        for name, stats in {**task_stats, GENERAL: general}.items()
    }
    return PatternSet(
        fingerprint=fingerprint,
        patterns=patterns,
        always_keep={layer: frozenset(ids) for layer, ids in (always_keep or {}).items()},
        metadata=dict(metadata or {}),
    )
