"""`taer discover`'s library step: a request log in, a tasks file that `taer calibrate` takes out.

``discover_tasks(LOG, OUT.yaml)`` reads the log (:mod:`retrieval.request_log`), embeds each prompt
with the retrieval index's encoder, clusters (:mod:`retrieval.discover`), names the clusters
(:mod:`retrieval.cluster_names`), keeps a seeded ``held_out`` share of each cluster apart, and writes

    OUT.yaml                           tasks: {NAME: {calibration: ..., heldout: ...}}
    OUT_prompts/calibration/NAME.jsonl one prompt a line, as logged: {"messages": [...]} or {"prompt": ...}
    OUT_prompts/heldout/NAME.jsonl     the held-out share, same lines
    OUT_prompts/general.jsonl          the prompts that fit no task
    OUT_prompts/discovery.json         what was found: clusters, sizes, separation, options

The ``general`` pattern is TCESS pooled over every task and a tasks file has no place for prompts
of no task, so those go to ``general.jsonl`` for a person to read (a kind of work found there can
become a task of its own). Nothing is written until everything is computed, and then atomically:
the prompts directory is built beside its place and renamed, the YAML written to a temporary file
and renamed.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from expert_store.atomic import atomic_directory
from expert_store.errors import DiscoveryError
from retrieval.cluster_names import cluster_names
from retrieval.discover import DEFAULT_OPTIONS, Cluster, Discovery, DiscoveryOptions, cluster_prompts
from retrieval.encoder import Encoder, TextEncoder
from retrieval.request_log import RequestLog, read_request_log
from retrieval.tasks_file import CalibrationPrompt

SUMMARY_FILE = "discovery.json"
GENERAL_FILE = "general.jsonl"


@dataclass(frozen=True, slots=True)
class DiscoveredTask:
    """A named cluster and its prompts (indices into the log's prompts), split for calibration."""

    name: str
    cluster: Cluster
    calibration: tuple[int, ...]
    heldout: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DiscoveredTasks:
    """What `taer discover` found and wrote."""

    log: RequestLog
    discovery: Discovery
    tasks: tuple[DiscoveredTask, ...]
    tasks_file: Path
    prompts_dir: Path
    encoder: str

    @property
    def general(self) -> tuple[int, ...]:
        """The prompts that fit no task."""
        return self.discovery.noise


def prompts_dir_for(tasks_file: Path) -> Path:
    """Where the prompt files of ``tasks_file`` go: ``OUT_prompts`` beside ``OUT.yaml``."""
    return tasks_file.with_name(f"{tasks_file.stem}_prompts")


def discover_tasks(
    log_path: str | Path,
    out: str | Path,
    options: DiscoveryOptions = DEFAULT_OPTIONS,
    held_out: float = 0.2,
    encoder: TextEncoder | None = None,
    encoder_path: Path | None = None,
) -> DiscoveredTasks:
    """Discover the tasks in ``log_path`` and write ``out`` (see the module docstring)."""
    out = Path(out)
    _check_output(out, held_out)
    log = read_request_log(log_path)
    encoder = encoder if encoder is not None else Encoder.load(encoder_path)
    texts = log.texts
    vectors = (
        encoder.encode(texts, show_progress=True) if isinstance(encoder, Encoder) else encoder.encode(texts)
    )
    discovery = cluster_prompts(vectors, options)
    names = cluster_names(texts, [cluster.members for cluster in discovery.clusters])
    rng = np.random.default_rng(options.seed)
    tasks = tuple(
        _split(name, cluster, held_out, rng) for name, cluster in zip(names, discovery.clusters, strict=True)
    )
    result = DiscoveredTasks(log, discovery, tasks, out, prompts_dir_for(out), str(encoder.fingerprint))
    _write(result, options, held_out)
    return result


def _check_output(out: Path, held_out: float) -> None:
    """Refuse what would fail after the work, or overwrite a directory that is not ours."""
    if out.suffix not in (".yaml", ".yml"):
        raise DiscoveryError(f"--out {out}: give a .yaml path (the tasks file to write)")
    if not 0.0 <= held_out < 1.0:
        raise DiscoveryError(f"--held-out must lie in [0, 1), got {held_out}")
    prompts_dir = prompts_dir_for(out)
    if prompts_dir.exists() and not (prompts_dir / SUMMARY_FILE).is_file():
        raise DiscoveryError(
            f"{prompts_dir} exists and was not written by `taer discover`; choose another --out or move it"
        )
    if out.is_dir():
        raise DiscoveryError(f"--out {out} is a directory; give the tasks file's path")


def _split(name: str, cluster: Cluster, held_out: float, rng: np.random.Generator) -> DiscoveredTask:
    """A seeded ``held_out`` share of the cluster apart (the calibration set keeps at least one)."""
    members = np.array(cluster.members)
    num_held = min(round(held_out * len(members)), len(members) - 1)
    held = set(rng.choice(members, num_held, replace=False).tolist()) if num_held > 0 else set()
    calibration = tuple(sorted(int(i) for i in members if i not in held))
    return DiscoveredTask(name, cluster, calibration, tuple(sorted(held)))


def _write(result: DiscoveredTasks, options: DiscoveryOptions, held_out: float) -> None:
    out, prompts = result.tasks_file, result.log.prompts
    entries = {}
    staged = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with atomic_directory(result.prompts_dir) as tmp:
            for task in result.tasks:
                entry = {
                    "calibration": _write_lines(tmp, "calibration", task.name, task.calibration, prompts)
                }
                if task.heldout:
                    entry["heldout"] = _write_lines(tmp, "heldout", task.name, task.heldout, prompts)
                entries[task.name] = entry
            general = [prompts[i].prompt for i in result.general]
            (tmp / GENERAL_FILE).write_text("".join(_line(p) for p in general), encoding="utf-8")
            summary = _summary(result, options, held_out)
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            staged.write_text(_yaml_text(result, entries), encoding="utf-8")
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)


def _write_lines(root: Path, split: str, name: str, indices: tuple[int, ...], prompts) -> str:
    (root / split).mkdir(exist_ok=True)
    (root / split / f"{name}.jsonl").write_text(
        "".join(_line(prompts[i].prompt) for i in indices), encoding="utf-8"
    )
    return f"{split}/{name}.jsonl"


def _line(prompt: CalibrationPrompt) -> str:
    messages = prompt.chat_messages()
    record = {"prompt": prompt.prompt} if messages is None else {"messages": messages}
    return json.dumps(record, ensure_ascii=False) + "\n"


def _yaml_text(result: DiscoveredTasks, entries: dict[str, dict[str, str]]) -> str:
    relative = result.prompts_dir.name
    tasks = {
        name: {key: f"{relative}/{path}" for key, path in entry.items()} for name, entry in entries.items()
    }
    header = (
        f"# Discovered by `taer discover` from {result.log.path.name}: {len(result.log.prompts)} distinct "
        f"prompts, {len(result.tasks)} tasks.\n"
        f"# {len(result.general)} prompts fit no task: {relative}/{GENERAL_FILE} (the general pattern pools "
        "every task; they are not calibrated).\n"
        "# Rename the tasks freely, then: taer calibrate STORE_DIR THIS_FILE --out PATTERNS_DIR\n"
    )
    return header + yaml.safe_dump({"tasks": tasks}, sort_keys=False)


def _summary(result: DiscoveredTasks, options: DiscoveryOptions, held_out: float) -> dict:
    discovery, texts = result.discovery, result.log.texts
    return {
        "log": str(result.log.path),
        "prompts": len(texts),
        "repeats_dropped": result.log.num_repeats,
        "encoder": result.encoder,
        "options": {
            "clusters": options.num_clusters,
            "min_size": options.min_size,
            "min_similarity": options.min_similarity,
            "neighbours": options.neighbours,
            "max_fit": options.max_fit,
            "seed": options.seed,
            "held_out": held_out,
        },
        "chosen_by": discovery.chosen_by,
        "fitted": discovery.num_fitted,
        "silhouette": discovery.silhouette,
        "silhouette_by_k": {str(k): v for k, v in discovery.silhouette_by_k.items()},
        "tasks": [
            {
                "name": task.name,
                "size": task.cluster.size,
                "calibration": len(task.calibration),
                "heldout": len(task.heldout),
                "silhouette": task.cluster.silhouette,
                "margin": task.cluster.margin,
                "central": [texts[i] for i in task.cluster.members[:5]],
            }
            for task in result.tasks
        ],
        "general": [texts[i] for i in result.general],
    }
