"""What `taer serve --record` keeps of each served request's routing, and how it is read back.

A refinement (:mod:`retrieval.refine`) must update a task's TCESS with the served requests as if
they had been among its calibration prompts. TCESS is not a function of the router's top-k choices:
a token adds s~_i = f(s_i) for each expert of its Ka best scores whose share p_i (softmax over
those Ka) reaches the layer's confidence threshold r_l, so it needs the router's scores, not only
which experts won. Per-token scores are too large to log for every request ([tokens, layers, Ka]),
but TCESS is a mean over tokens, so per prompt the *sums* suffice: for each MoE layer and expert,
the summed s~ of the prompt's tokens and the number of tokens. Those are computed during the
prefill from the router logits the gate produces, with the thresholds r_l of the pattern that
serves the request (``general``'s when none does), exactly as calibration's
:class:`~retrieval.tcess.TaskStatsAccumulator` does with a fixed threshold (a test holds them
equal). The recorded routing is then on the scale of the calibration's: merged with a task's table,
both halves are means of s~ under the same r_l, and a refinement keeps r_l. (Recomputing r_l from
the served tokens would need their per-token scores again.) Beside them each record holds the
counts of the prompt's own top-k choices per layer and expert (the router check's statistic, and
the refined ``frequency`` table), both before any routing restriction. The router's mean
probabilities (the ``mean_prob`` table, a tie-break in selection) are not recorded: a refinement
leaves them as calibrated. Only the prompt's tokens are counted (the prefill); the generated tokens'
routing is not recorded, where calibration also counts each calibration prompt's response.

One JSON object a line (:meth:`RoutingRecord.to_line`)::

    {"v": 1, "time": "2026-12-03T10:00:00.123+00:00", "request_id": "chatcmpl-...",
     "prompt_sha256": "...", "retrieval_sha256": "...",       # always
     "prompt": "...", "retrieval_text": "...",                 # only with --record-text
     "task": "add", "mode": "exact", "similarity": 0.81, "confidence": 0.93,
     "patterns": "2026-12-02T17:54:35+00:00",                  # creation time of the patterns used
     "tokens": 23, "shape": [4, 16],                           # prompt tokens; [MoE layers, experts]
     "routing": [[[3, 12, 5.21], [7, 9, 3.9]], ...]}           # per MoE layer: [expert, count, s~ sum]

``routing`` lists per layer only the experts with a choice or a contribution. ``prompt`` is the
prompt as the model saw it (chat template applied, decoded from its tokens); ``retrieval_text`` is
what retrieval embedded (the last user message, or the prompt).

Files are ``routing-NNNNNN.jsonl`` in one directory, numbered in the order written. A writer that
stops mid-line (a crash) leaves a last line without its newline: :func:`read_records` skips it, and
any line that is not a record of this version, and says how many it skipped.

Legend: t = tokens, P = prompts, L = MoE layers, E = experts, K = Ka.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import Tensor

from retrieval.router_check import count_choices
from retrieval.tcess import Scoring, expected_scores, limit_to_groups, selection_scores

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
FILE_PATTERN = re.compile(r"routing-(\d{6,})\.jsonl")


def record_file_name(number: int) -> str:
    return f"routing-{number:06d}.jsonl"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ScoreRule:
    """How a router's scores become TCESS contributions: the patterns' ``ka`` and ``scoring``, the
    model's top-k, and for ``sigmoid_bias`` routers the selection bias [L, E] and expert groups."""

    ka: int
    top_k: int
    scoring: Scoring = "softmax"
    bias: Tensor | None = None
    num_groups: int = 1
    topk_groups: int = 1


def prompt_routing(
    logits: Tensor,
    prompt_of: Tensor,
    num_prompts: int,
    thresholds: Tensor,
    rule: ScoreRule,
    layer: int,
) -> tuple[Tensor, Tensor]:
    """One MoE layer's routing of a prefill's real tokens, summed per prompt.

    ``logits`` [t, E] are the router's, ``prompt_of`` [t] each token's prompt, ``thresholds`` [t]
    each token's r_l (its prompt's pattern's, at this layer), ``layer`` the row of ``rule.bias``.
    Returns (counts [P, E] int32 of each token's own top-k, sums [P, E] float32 of its s~).
    """
    num_experts = logits.shape[-1]
    bias = None if rule.bias is None else rule.bias[layer].to(logits.device)
    scores = selection_scores(logits.float(), rule.scoring, bias)  # [t, E]
    scores = limit_to_groups(scores, rule.num_groups, rule.topk_groups)
    top_scores, top_ids = scores.topk(max(rule.ka, rule.top_k), dim=-1)  # [t, K'], best first
    counts = count_choices(top_ids[:, : rule.top_k], prompt_of, num_prompts, num_experts)  # [P, E]
    values, _ = expected_scores(top_scores[:, : rule.ka], thresholds.float().unsqueeze(1))  # [t, K]
    bins = (prompt_of.unsqueeze(1) * num_experts + top_ids[:, : rule.ka]).reshape(-1)  # [t*K]
    sums = torch.zeros(num_prompts * num_experts, dtype=torch.float32, device=logits.device)
    sums.index_add_(0, bins, values.reshape(-1))
    return counts, sums.reshape(num_prompts, num_experts)


@dataclass(frozen=True, eq=False)
class RoutingRecord:
    """One served request (see the module docstring). ``counts`` [L, E] and ``tcess_sums`` [L, E]
    are over its ``num_tokens`` prompt tokens."""

    time: datetime
    request_id: str
    task: str | None
    mode: str
    num_tokens: int
    counts: Tensor
    tcess_sums: Tensor
    prompt_sha256: str
    retrieval_sha256: str
    similarity: float | None = None
    confidence: float | None = None
    patterns: str | None = None
    prompt: str | None = None
    retrieval_text: str | None = None

    def to_line(self) -> bytes:
        """The record as one JSON line, newline included."""
        document = {
            "v": RECORD_VERSION,
            "time": self.time.isoformat(timespec="milliseconds"),
            "request_id": self.request_id,
            "prompt_sha256": self.prompt_sha256,
            "retrieval_sha256": self.retrieval_sha256,
        }
        if self.prompt is not None:
            document |= {"prompt": self.prompt, "retrieval_text": self.retrieval_text}
        document |= {
            "task": self.task,
            "mode": self.mode,
            "similarity": self.similarity,
            "confidence": self.confidence,
            "patterns": self.patterns,
            "tokens": self.num_tokens,
            "shape": list(self.counts.shape),
            "routing": _sparse(self.counts, self.tcess_sums),
        }
        return (json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, document: dict) -> RoutingRecord:
        """A record from its parsed line; ``KeyError``, ``TypeError`` or ``ValueError`` if it is not one."""
        if document.get("v") != RECORD_VERSION:
            raise ValueError(f"record version {document.get('v')!r}, this taer reads {RECORD_VERSION}")
        num_layers, num_experts = (int(n) for n in document["shape"])
        counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        sums = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        if len(document["routing"]) != num_layers:
            raise ValueError(f"{len(document['routing'])} routing layers for shape {document['shape']}")
        for layer, entries in enumerate(document["routing"]):
            for expert, count, total in entries:
                counts[layer, int(expert)] = int(count)
                sums[layer, int(expert)] = float(total)
        return cls(
            time=datetime.fromisoformat(document["time"]),
            request_id=str(document["request_id"]),
            task=document["task"],
            mode=str(document["mode"]),
            num_tokens=int(document["tokens"]),
            counts=counts,
            tcess_sums=sums,
            prompt_sha256=str(document["prompt_sha256"]),
            retrieval_sha256=str(document["retrieval_sha256"]),
            similarity=document.get("similarity"),
            confidence=document.get("confidence"),
            patterns=document.get("patterns"),
            prompt=document.get("prompt"),
            retrieval_text=document.get("retrieval_text"),
        )


def _sparse(counts: Tensor, sums: Tensor) -> list[list[list]]:
    """Per layer, ``[expert, count, s~ sum]`` for every expert with either."""
    rows = []
    for layer_counts, layer_sums in zip(counts.tolist(), sums.tolist(), strict=True):
        rows.append(
            [
                [expert, count, float(f"{total:.7g}")]
                for expert, (count, total) in enumerate(zip(layer_counts, layer_sums, strict=True))
                if count or total
            ]
        )
    return rows


@dataclass
class RecordScan:
    """What :func:`read_records` went through: the files, and the lines it skipped (a torn last
    line, a line that is not a record of this version)."""

    files: list[Path] = field(default_factory=list)
    num_records: int = 0
    num_skipped: int = 0


def record_files(directory: str | Path) -> list[Path]:
    """The record files of ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    numbered = [(int(m.group(1)), p) for p in directory.iterdir() if (m := FILE_PATTERN.fullmatch(p.name))]
    return [path for _, path in sorted(numbered)]


def read_records(directory: str | Path, scan: RecordScan | None = None) -> Iterator[RoutingRecord]:
    """Every record in ``directory``'s files, oldest first; ``scan`` (if given) counts what was read
    and skipped."""
    scan = scan if scan is not None else RecordScan()
    for path in record_files(directory):
        scan.files.append(path)
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                record = _parse(line, path, number)
                if record is None:
                    scan.num_skipped += 1
                    continue
                scan.num_records += 1
                yield record


def _parse(line: bytes, path: Path, number: int) -> RoutingRecord | None:
    if not line.endswith(b"\n"):  # the writer stopped mid-line: a torn last line
        logger.warning("%s:%d: a torn last line (the writer stopped mid-write); skipped", path, number)
        return None
    try:
        return RoutingRecord.from_json(json.loads(line))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("%s:%d: not a routing record (%s); skipped", path, number, error)
        return None
