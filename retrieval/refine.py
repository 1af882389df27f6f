"""`taer calibrate --refine DIR`: each pattern's TCESS moved toward the routing of the requests it
served, as `taer serve --record DIR` recorded them.

A record holds, per MoE layer and expert, the summed TCESS contributions s~ of a request's prompt
tokens under the thresholds r_l of the pattern that served it, the counts of the tokens' own top-k
choices, and the number of tokens (:mod:`retrieval.routing_record` says why these and not the
choices alone). For every pattern (``general`` too: the requests retrieval sent to it) with at
least ``min_requests`` usable records, the recorded tables are the sums over those requests divided
by their tokens, and the refined pattern is the weighted merge

    TCESS'    = (1 - w) * TCESS    + w * sum(s~) / tokens
    frequency' = (1 - w) * frequency + w * sum(counts) / tokens

with ``w`` the refinement weight: the share the recorded requests take in the result (0 keeps the
pattern, 1 replaces it by the recorded routing). The thresholds r_l stay as calibrated, since the
recorded s~ were computed with them, and so does ``mean_prob`` (not recorded; a tie-break). A
pattern without enough records is left as it is.

Usable records: those written since the patterns were made (their creation time), so that a
refinement never counts a request twice; of requests served in exact mode (the model's own
routing), and in pruned mode only when asked (``include_pruned``: past the first MoE layer their
routing follows hidden states the pruned experts computed, biased toward the pattern that served
them). Requests of the full model name no pattern and are not used.

The refined patterns replace the directory atomically, with its retrieval index and router check
profile carried over unchanged (:func:`save_refined`); a running server picks them up on SIGHUP or
``POST /v1/taer/reload``. :func:`propose_tasks` clusters the recorded texts of requests served by
``general`` (the fallback: like no task stored) as `taer discover` does, and writes the dense
groups it finds as a tasks file, to calibrate as new tasks.

Legend: L = MoE layers, E = experts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from torch import Tensor

from expert_store.atomic import atomic_directory
from expert_store.errors import DiscoveryError, PatternError
from retrieval.discover import DEFAULT_OPTIONS, DiscoveryOptions
from retrieval.patterns import META_FILE, TENSORS_FILE, Pattern, PatternSet
from retrieval.routing_record import RecordScan, RoutingRecord, read_records
from retrieval.tasks_file import GENERAL
from retrieval.tcess import TaskStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RefineOptions:
    """``weight``: the recorded requests' share in a refined pattern; ``min_requests``: fewer leave a
    pattern as it is; ``include_pruned``: use requests served in pruned mode too."""

    weight: float = 0.5
    min_requests: int = 8
    include_pruned: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise PatternError(f"--refine-weight must lie in [0, 1], got {self.weight}")
        if self.min_requests < 1:
            raise PatternError(f"--refine-min-requests must be at least 1, got {self.min_requests}")


@dataclass
class RecordedRouting:
    """The summed routing of one pattern's recorded requests: counts and s~ sums [L, E]."""

    num_requests: int = 0
    num_tokens: int = 0
    counts: Tensor | None = None
    tcess_sums: Tensor | None = None

    def add(self, record: RoutingRecord) -> None:
        self.num_requests += 1
        self.num_tokens += record.num_tokens
        if self.counts is None:
            self.counts, self.tcess_sums = record.counts.clone(), record.tcess_sums.clone()
        else:
            self.counts += record.counts
            self.tcess_sums += record.tcess_sums

    @property
    def tcess(self) -> Tensor:
        """The recorded requests' TCESS [L, E] (float64)."""
        return self.tcess_sums.double() / max(self.num_tokens, 1)

    @property
    def frequency(self) -> Tensor:
        """How often each expert is among a recorded token's own top-k [L, E] (float64)."""
        return self.counts.double() / max(self.num_tokens, 1)


@dataclass
class Refinement:
    """What a refinement read and did: the patterns ``before`` and after (``patterns``), each
    pattern's recorded routing, the patterns it merged (``refined``), the records it did not use by
    reason, and the fallback requests' texts."""

    before: PatternSet
    patterns: PatternSet
    routing: dict[str, RecordedRouting]
    refined: list[str]
    options: RefineOptions
    scan: RecordScan
    unused: Counter = field(default_factory=Counter)
    fallback_texts: list[str] = field(default_factory=list)

    def moved(self, task: str) -> float:
        """How far ``task``'s TCESS moved: sum |after - before| / sum |before|."""
        old, new = self.before.get(task).stats.tcess, self.patterns.get(task).stats.tcess
        return float((new - old).abs().sum() / old.abs().sum().clamp(min=1e-12))


def collect_routing(
    records_dir: Path, patterns: PatternSet, options: RefineOptions
) -> tuple[dict[str, RecordedRouting], Counter, RecordScan, list[str]]:
    """Sum the usable records of ``records_dir`` per pattern (see the module docstring); also the
    unused ones counted by reason, what was read, and the fallback requests' recorded texts."""
    since = datetime.fromisoformat(patterns.created)
    shape = tuple(patterns.general.stats.tcess.shape)
    routing: dict[str, RecordedRouting] = {}
    unused: Counter = Counter()
    scan, texts = RecordScan(), []
    for record in read_records(records_dir, scan):
        reason = _unusable(record, patterns, options, since, shape)
        if reason is None:
            routing.setdefault(record.task, RecordedRouting()).add(record)
        else:
            unused[reason] += 1
        if record.task == GENERAL and record.retrieval_text and record.time >= since:
            texts.append(record.retrieval_text)
    return routing, unused, scan, texts


def _unusable(
    record: RoutingRecord, patterns: PatternSet, options: RefineOptions, since: datetime, shape: tuple
) -> str | None:
    """Why ``record`` cannot refine a pattern, or None."""
    if record.time < since:
        return "recorded before these patterns were made"
    if tuple(record.counts.shape) != shape:
        return f"routing of another shape than the patterns' {list(shape)}"
    if record.task is None:
        return "served by the full model (no pattern)"
    if record.task not in patterns:
        return "served by a task these patterns lack"
    if record.mode == "pruned" and not options.include_pruned:
        return "served in pruned mode (--refine-pruned uses them)"
    return None


def merge_stats(stats: TaskStats, recorded: RecordedRouting, weight: float) -> TaskStats:
    """``stats`` with TCESS and frequency merged with the recorded ones (the module's formula)."""

    def merged(table: Tensor, seen: Tensor) -> Tensor:
        return ((1.0 - weight) * table.double() + weight * seen).float()

    return dataclasses.replace(
        stats,
        tcess=merged(stats.tcess, recorded.tcess),
        frequency=merged(stats.frequency, recorded.frequency),
        num_tokens=stats.num_tokens + recorded.num_tokens,
    )


def refine(patterns: PatternSet, records_dir: Path, options: RefineOptions = RefineOptions()) -> Refinement:
    """The refined pattern set (not written; see :func:`save_refined`), created now."""
    routing, unused, scan, texts = collect_routing(Path(records_dir), patterns, options)
    refined = [
        name
        for name in patterns.patterns
        if routing.get(name, RecordedRouting()).num_requests >= options.min_requests
    ]
    merged = {}
    for name, pattern in patterns.patterns.items():
        if name not in refined:
            merged[name] = pattern
            continue
        recorded = routing[name]
        note = {"requests": recorded.num_requests, "tokens": recorded.num_tokens, "weight": options.weight}
        merged[name] = Pattern(
            name,
            merge_stats(pattern.stats, recorded, options.weight),
            pattern.super_experts,
            {**pattern.metadata, "refined": [*pattern.metadata.get("refined", []), note]},
        )
    history = {
        "records": str(Path(records_dir).resolve()),
        "since": patterns.created,
        "weight": options.weight,
        "include_pruned": options.include_pruned,
        "requests": {name: routing[name].num_requests for name in refined},
    }
    result = PatternSet(
        fingerprint=patterns.fingerprint,
        patterns=merged,
        always_keep=patterns.always_keep,
        # To the millisecond, as records are: the next refinement uses only the records after it.
        created=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        metadata={**patterns.metadata, "refinements": [*patterns.metadata.get("refinements", []), history]},
    )
    return Refinement(patterns, result, routing, refined, options, scan, unused, texts)


def refine_patterns(
    patterns_dir: Path,
    records_dir: Path,
    store_dir: Path,
    options: RefineOptions = RefineOptions(),
    *,
    tasks_file: Path | None = None,
    out: Path | None = None,
) -> Refinement:
    """Refine the patterns of ``patterns_dir`` (made for ``store_dir``'s model, and from
    ``tasks_file``'s tasks when given) with the records of ``records_dir``, and write them to ``out``
    (default: in place), atomically. Nothing is written when no pattern has enough records."""
    from retrieval.calibrate import load_patterns_for_store

    if not Path(records_dir).is_dir():
        raise PatternError(f"no record directory {records_dir}; give the DIR `taer serve --record` wrote")
    patterns = load_patterns_for_store(patterns_dir, store_dir)
    if tasks_file is not None:
        _check_tasks(patterns, tasks_file, patterns_dir)
    result = refine(patterns, records_dir, options)
    if result.refined:
        save_refined(result.patterns, patterns_dir, out)
    return result


def _check_tasks(patterns: PatternSet, tasks_file: Path, patterns_dir: Path) -> None:
    from retrieval.tasks_file import load_tasks_file

    names = [task.name for task in load_tasks_file(tasks_file)]
    if sorted(names) != sorted(patterns.tasks):
        raise PatternError(
            f"the patterns in {patterns_dir} are of tasks {', '.join(patterns.tasks)}, {tasks_file} has "
            f"{', '.join(names)}: give the tasks file they were calibrated from"
        )


def save_refined(patterns: PatternSet, source: Path, out: Path | None = None) -> None:
    """Write ``patterns`` as ``out`` (default: ``source`` itself), atomically: the directory is built
    beside its place with everything else of ``source`` (retrieval index, router check profile)
    copied, then renamed over it."""
    source = Path(source)
    with atomic_directory(Path(out or source)) as tmp:
        for entry in source.iterdir():
            if entry.name in (TENSORS_FILE, META_FILE) or entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)
        patterns.save(tmp)


def propose_tasks(
    texts: list[str],
    out: Path,
    options: DiscoveryOptions = DEFAULT_OPTIONS,
    encoder_path: Path | None = None,
):
    """Cluster the fallback requests' ``texts`` as `taer discover` does and write the groups found
    as the tasks file ``out`` (its prompts beside it, and the texts clustered as
    ``OUT_fallback.jsonl``). Returns the :class:`~retrieval.discover_tasks.DiscoveredTasks`, or
    ``None`` when no group is dense enough (or there are no texts)."""
    from retrieval.discover_tasks import discover_tasks

    if not texts:
        return None
    log = out.with_name(f"{out.stem}_fallback.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(json.dumps({"prompt": t}, ensure_ascii=False) + "\n" for t in texts), "utf-8")
    try:
        return discover_tasks(log, out, options, encoder_path=encoder_path)
    except DiscoveryError as error:
        logger.info("no new task among %d fallback requests: %s", len(texts), error)
        return None
