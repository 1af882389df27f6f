"""Retrieval latency: embed + search + vote per query and per batch, flat against HNSW, by index size.

Stored vectors are synthetic but shaped like real ones: each is a real encoded phrasing of a task
plus Gaussian noise (cosine about 0.6 to its phrasing), labelled with that task, so the approximate
index meets clustered data as it would in use. Queries are other real phrasings, encoded for real.
Run ``python -m benchmarks.retrieval_latency --out DIR`` or, wired by the CLI, ``taer bench``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from retrieval.encoder import (
    ENCODER_DTYPES,
    Encoder,
    EncoderFingerprint,
    TextEncoder,
    cpu_has_native_bf16,
    resolve_encoder_dtype,
)
from retrieval.index import DEFAULT_SETTINGS, IndexSettings, TaskIndex

logger = logging.getLogger(__name__)

TARGET_SIZE = 10_000
TARGET_SINGLE_P99_MS = 20.0
NOISE_PER_DIM = 0.068  # noise norm ~1.33 in 384 dimensions: cosine ~0.6 to the source phrasing
_WORDS = ("planet", "window", "banana", "river", "lantern", "copper", "meadow", "violin", "harbor", "pencil")
_LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese")
_TEMPLATES = {
    "arithmetic": ("What is {a} plus {b}?", "Compute {a} minus {b}.", "Multiply {a} by {b}, please."),
    "reversal": ("Reverse the string '{w}'.", "Write '{w}' backwards.", "What is '{w}' spelled in reverse?"),
    "translation": (
        "Translate '{w}' into {lang}.",
        "How do you say '{w}' in {lang}?",
        "Give the {lang} word for '{w}'.",
    ),
    "sorting": (
        "Sort these numbers: {a}, {b}, {c}.",
        "Put {a} {b} {c} in ascending order.",
        "Order {c}, {a}, {b} from small to large.",
    ),
    "counting": (
        "How many letters are in '{w}'?",
        "Count the vowels in '{w}'.",
        "How many times does 'a' occur in '{w}'?",
    ),
    "capitalise": (
        "Write '{w}' in capital letters.",
        "Uppercase the word '{w}'.",
        "Capitalise every letter of '{w}'.",
    ),
    "code": (
        "Write a Python function that returns {a} times x.",
        "Fix this code: print({a} +)",
        "Implement a loop summing 1 to {b} in Python.",
    ),
    "summary": (
        "Summarise the story of the {w} in one line.",
        "Give a short summary of a text about a {w}.",
        "TL;DR of an article on the {w} market.",
    ),
}


def synthetic_phrasings(count: int, seed: int) -> tuple[list[str], list[str]]:
    """``count`` (text, task) pairs drawn from fixed templates: returns texts and their tasks."""
    rng = np.random.default_rng(seed)
    tasks = sorted(_TEMPLATES)
    texts, labels = [], []
    for _ in range(count):
        task = tasks[rng.integers(len(tasks))]
        template = _TEMPLATES[task][rng.integers(len(_TEMPLATES[task]))]
        a, b, c = (int(n) for n in rng.integers(1, 1000, size=3))
        word, language = _WORDS[rng.integers(len(_WORDS))], _LANGUAGES[rng.integers(len(_LANGUAGES))]
        texts.append(template.format(a=a, b=b, c=c, w=word, lang=language))
        labels.append(task)
    return texts, labels


def synthetic_store(encoder: TextEncoder, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``size`` unit vectors [size, D] scattered around real encoded phrasings, with their tasks."""
    rng = np.random.default_rng(seed)
    base_texts, base_tasks = synthetic_phrasings(min(size, 512), seed)
    base = encoder.encode(base_texts)  # [B, D]
    pick = rng.integers(len(base), size=size)  # [size]
    vectors = (
        base[pick] + rng.standard_normal((size, encoder.dim), dtype=np.float32) * NOISE_PER_DIM
    )  # [size, D]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, [base_tasks[i] for i in pick]


def run_latency(
    encoder: TextEncoder | None = None,
    sizes: tuple[int, ...] = (1_000, 10_000, 100_000),
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    queries: int = 200,
    kinds: tuple[str, ...] = ("flat", "hnsw"),
    k: int = 8,
    settings: IndexSettings = DEFAULT_SETTINGS,
    seed: int = 0,
    min_calls: int = 20,
    encoder_dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    encoder_dir: Path | None = None,
) -> dict:
    """Measure per-call latency (ms) of embedding alone, search alone, and the whole query.

    Every configuration times ``max(queries // batch, min_calls)`` calls. Returns a JSON-able dict; see
    :func:`render_latency_markdown`. With both kinds, ``recall`` is HNSW's share of flat's k nearest.
    Unless ``encoder_dtypes`` is empty, ``report["encoder_dtypes"]`` is :func:`compare_encoder_dtypes`
    for the model at ``encoder_dir`` (the packaged default when None), loaded anew once per dtype
    whatever ``encoder`` is (it may be a fake).
    """
    encoder = encoder or Encoder.load()
    texts, _ = synthetic_phrasings(queries, seed + 1)
    batches = {b: _batches(texts, b, max(queries // b, min_calls)) for b in batch_sizes}
    report = {
        "encoder": str(encoder.fingerprint),
        "k": k,
        "queries": queries,
        "faiss_threads": settings.num_threads,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "target": {"size": TARGET_SIZE, "single_p99_ms": TARGET_SINGLE_P99_MS},
        "embed": [{"batch": b, **_time_calls(encoder.encode, batches[b])} for b in batch_sizes],
        "rows": [],
    }
    query_vectors = {b: [encoder.encode(batch) for batch in batches[b]] for b in batch_sizes}
    for size in sizes:
        report["rows"] += _measure_size(encoder, size, kinds, batches, query_vectors, k, settings, seed)
    report["target"].update(_target_verdict(report["rows"]))
    if encoder_dtypes:
        report["encoder_dtypes"] = compare_encoder_dtypes(
            encoder_dir, encoder_dtypes, batch_sizes, queries, seed, min_calls
        )
        compared = EncoderFingerprint.parse(report["encoder_dtypes"]["encoder"])
        if isinstance(encoder, Encoder) and not compared.matches(encoder.fingerprint):
            logger.warning(
                "the dtype comparison ran on %s, not the encoder measured; pass encoder_dir", compared
            )
    return report


def compare_encoder_dtypes(
    encoder_dir: Path | None,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    batch_sizes: tuple[int, ...] = (1, 8),
    queries: int = 200,
    seed: int = 0,
    min_calls: int = 20,
) -> dict:
    """Embedding latency and fidelity of the same model with its weights in each of ``dtypes``.

    Loads one :class:`Encoder` per dtype and times them call by call in turn on the same batches, so
    that machine noise hits every dtype alike. Each row gives p50/p99 ms, the p50 as a ratio to
    float32's (float32 is the reference, added when missing) and the min and mean cosine of the
    dtype's vectors to float32's over the ``queries`` texts.
    """
    names = list(dict.fromkeys(("float32", *dtypes)))
    encoders = {name: Encoder.load(encoder_dir, dtype=name) for name in names}
    texts, _ = synthetic_phrasings(queries, seed + 1)
    reference = encoders["float32"].encode(texts)  # [N, D]
    cosines = {name: (encoder.encode(texts) * reference).sum(axis=1) for name, encoder in encoders.items()}
    calls = {name: encoder.encode for name, encoder in encoders.items()}
    rows = []
    for b in batch_sizes:
        timed = _time_interleaved(calls, _batches(texts, b, max(queries // b, min_calls)))
        for name in names:
            rows.append(
                {
                    "dtype": name,
                    "torch_dtype": str(encoders[name].dtype).removeprefix("torch."),
                    "batch": b,
                    **timed[name],
                    "p50_vs_float32": timed[name]["p50_ms"] / timed["float32"]["p50_ms"],
                    "min_cosine": float(cosines[name].min()),
                    "mean_cosine": float(cosines[name].mean()),
                }
            )
    return {
        "encoder": str(encoders["float32"].fingerprint),
        "auto_dtype": str(resolve_encoder_dtype("auto", "cpu")).removeprefix("torch."),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "queries": queries,
        "rows": rows,
    }


def _measure_size(
    encoder: TextEncoder,
    size: int,
    kinds: tuple[str, ...],
    batches: dict[int, list[list[str]]],
    query_vectors: dict[int, list[np.ndarray]],
    k: int,
    settings: IndexSettings,
    seed: int,
) -> list[dict]:
    vectors, tasks = synthetic_store(encoder, size, seed)
    ids = [f"synthetic-{i}" for i in range(size)]
    exact_ids: dict[int, list[list[int]]] = {}
    rows = []
    for kind in sorted(kinds, key=lambda kind: kind != "flat"):  # flat first: it is the recall reference
        started = time.perf_counter()
        index = TaskIndex.from_vectors(encoder, vectors, tasks, ids, kind=kind, settings=settings)
        build_s = time.perf_counter() - started
        for b in tqdm(batches, desc=f"{kind} {size:,}", unit="batch size", leave=False):
            found = [[n.text_id for n in hits] for v in query_vectors[b] for hits in index.search(v, k)]
            if kind == "flat":
                exact_ids[b] = found
            rows.append(
                {
                    "kind": kind,
                    "size": size,
                    "batch": b,
                    "build_s": round(build_s, 3),
                    "search": _time_calls(partial(index.search, k=k), query_vectors[b]),
                    "total": _time_calls(partial(index.query, k=k), batches[b]),
                    "recall": _recall(found, exact_ids[b]) if b in exact_ids else None,
                }
            )
    return rows


def render_latency_markdown(report: dict) -> str:
    """Tables: embedding alone, then search and whole-query latency, then HNSW against flat."""
    lines = [
        f"Encoder `{report['encoder']}`, k={report['k']}, {report['queries']} query texts, "
        f"FAISS threads {report['faiss_threads']}, torch threads {report['torch_threads']}, "
        f"{report['cpu_count']} CPUs. Times in ms per call (a call embeds/searches one batch).",
        "",
        "| batch | embed p50 | embed p99 | embed per query |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in report["embed"]:
        lines.append(
            f"| {row['batch']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['p50_ms'] / row['batch']:.2f} |"
        )
    lines += [
        "",
        "| kind | vectors | batch | build s | search p50 | search p99 | total p50 | total p99 | total per query | search share | recall@k |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        search, total = row["search"], row["total"]
        recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
        lines.append(
            f"| {row['kind']} | {row['size']:,} | {row['batch']} | {row['build_s']:.2f} | {search['p50_ms']:.3f} "
            f"| {search['p99_ms']:.3f} | {total['p50_ms']:.2f} | {total['p99_ms']:.2f} "
            f"| {total['p50_ms'] / row['batch']:.2f} | {search['p50_ms'] / total['p50_ms']:.1%} | {recall} |"
        )
    lines += _ratio_lines(report["rows"])
    if "encoder_dtypes" in report:
        lines += _dtype_lines(report["encoder_dtypes"])
    target = report["target"]
    if target.get("measured_p99_ms") is not None:
        verdict = "met" if target["met"] else "NOT met"
        lines += [
            "",
            f"Target: single-query p99 <= {target['single_p99_ms']:.0f} ms at {target['size']:,} vectors "
            f"({target['kind']}): {target['measured_p99_ms']:.2f} ms, {verdict}.",
        ]
    return "\n".join(lines) + "\n"


def write_latency_report(report: dict, out_dir: str | Path) -> Path:
    """Write ``retrieval_latency.json`` and ``retrieval_latency.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "retrieval_latency.json").write_text(json.dumps(report, indent=2))
    (out_dir / "retrieval_latency.md").write_text(render_latency_markdown(report))
    return out_dir


def _batches(texts: list[str], size: int, count: int) -> list[list[str]]:
    # Cycle through the texts so that large batches still give enough calls for a p99.
    return [[texts[(i * size + j) % len(texts)] for j in range(size)] for i in range(count)]


def _time_calls(call, inputs: list) -> dict:
    return _time_interleaved({"call": call}, inputs)["call"]


def _time_interleaved(calls: dict[str, Callable], inputs: list) -> dict[str, dict]:
    """Per-call latency of each of ``calls`` on every input, taking turns input by input."""
    for call in calls.values():
        call(inputs[0])  # warm-up: first calls allocate and fill caches
    elapsed: dict[str, list[float]] = {name: [] for name in calls}
    for i, item in enumerate(inputs):
        # Alternate who goes first, so that neither always runs on caches the other just warmed.
        for name in list(calls)[:: 1 if i % 2 == 0 else -1]:
            started = time.perf_counter()
            calls[name](item)
            elapsed[name].append(time.perf_counter() - started)
    return {name: _percentiles(np.asarray(seconds) * 1e3) for name, seconds in elapsed.items()}


def _percentiles(ms: np.ndarray) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "calls": len(ms)}


def _recall(found: list[list[int]], exact: list[list[int]]) -> float:
    hits = sum(len(set(f) & set(e)) for f, e in zip(found, exact, strict=True))
    return hits / max(sum(len(e) for e in exact), 1)


def _ratio_lines(rows: list[dict]) -> list[str]:
    flat = {(r["size"], r["batch"]): r for r in rows if r["kind"] == "flat"}
    pairs = [
        (flat[(r["size"], r["batch"])], r)
        for r in rows
        if r["kind"] == "hnsw" and (r["size"], r["batch"]) in flat
    ]
    if not pairs:
        return []
    lines = [
        "",
        "| vectors | batch | flat/hnsw search p50 | flat/hnsw total p50 |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for f, h in pairs:
        search = f["search"]["p50_ms"] / h["search"]["p50_ms"]
        total = f["total"]["p50_ms"] / h["total"]["p50_ms"]
        lines.append(f"| {f['size']:,} | {f['batch']} | {search:.2f}x | {total:.2f}x |")
    return lines


def _dtype_lines(comparison: dict) -> list[str]:
    lines = [
        "",
        f"Encoder weight dtypes (`{comparison['encoder']}`, torch threads {comparison['torch_threads']}, "
        f"calls interleaved): `auto` is {comparison['auto_dtype']} here "
        f"(native bfloat16: {'yes' if comparison['cpu_native_bf16'] else 'no'}); "
        f"cosine to float32 over {comparison['queries']} texts.",
        "",
        "| dtype | batch | p50 | p99 | p50 vs float32 | min cosine |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in comparison["rows"]:
        lines.append(
            f"| {row['dtype']} | {row['batch']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
            f"| {row['p50_vs_float32']:.2f}x | {row['min_cosine']:.5f} |"
        )
    return lines


def _target_verdict(rows: list[dict]) -> dict:
    """The single-query p99 at the target size, for the kind ``auto`` would pick there (flat)."""
    candidates = [r for r in rows if r["size"] == TARGET_SIZE and r["batch"] == 1]
    if not candidates:
        return {"measured_p99_ms": None, "met": None, "kind": None}
    row = min(candidates, key=lambda r: r["kind"] != "flat")
    p99 = row["total"]["p99_ms"]
    return {"measured_p99_ms": p99, "met": p99 <= TARGET_SINGLE_P99_MS, "kind": row["kind"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results", help="directory for the JSON and markdown")
    parser.add_argument("--encoder", default=None, help="sentence-transformers model directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw"], choices=["flat", "hnsw"])
    parser.add_argument(
        "--encoder-dtypes",
        nargs="*",
        default=["float32", "bfloat16"],
        choices=list(ENCODER_DTYPES),
        help="weight dtypes to compare for embedding latency (none to skip)",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch intra-op threads (process-wide)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    report = run_latency(
        Encoder.load(args.encoder),
        tuple(args.sizes),
        tuple(args.batch_sizes),
        args.queries,
        tuple(args.kinds),
        encoder_dtypes=tuple(args.encoder_dtypes),
        encoder_dir=args.encoder,
    )
    write_latency_report(report, args.out)
    print(render_latency_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
