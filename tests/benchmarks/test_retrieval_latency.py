"""Smoke test of the retrieval latency benchmark at tiny sizes, with the real encoder."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from benchmarks.retrieval_latency import (
    TARGET_SIZE,
    compare_encoder_dtypes,
    render_latency_markdown,
    run_latency,
    synthetic_phrasings,
    synthetic_store,
    write_latency_report,
)
from retrieval.encoder import Encoder, cpu_has_native_bf16


@pytest.fixture(scope="module")
def encoder() -> Iterator[Encoder]:
    # On a small shared CPU one torch thread is several times faster than OpenMP threads that
    # contend with other processes; restore the setting for the tests that follow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Encoder.load()
    torch.set_num_threads(threads)


def test_run_latency_tiny(tmp_path, encoder):
    report = run_latency(
        encoder, sizes=(300,), batch_sizes=(1, 4), queries=8, kinds=("hnsw", "flat"), min_calls=4
    )
    assert [(r["kind"], r["batch"]) for r in report["rows"]] == [
        ("flat", 1),
        ("flat", 4),
        ("hnsw", 1),
        ("hnsw", 4),
    ]
    for row in report["rows"]:
        assert row["size"] == 300
        assert row["search"]["calls"] == (8 if row["batch"] == 1 else 4)
        assert 0 < row["search"]["p50_ms"] <= row["search"]["p99_ms"]
        # Timed separately from the search alone, a whole query (embed + search) is only checked to
        # be measured: which of two medians of a few calls is larger depends on this busy machine.
        assert 0 < row["total"]["p50_ms"] <= row["total"]["p99_ms"]
    flat_recall = [r["recall"] for r in report["rows"] if r["kind"] == "flat"]
    hnsw_recall = [r["recall"] for r in report["rows"] if r["kind"] == "hnsw"]
    assert flat_recall == [1.0, 1.0]
    assert all(0.9 <= recall <= 1.0 for recall in hnsw_recall)  # 300 vectors: HNSW is all but exact
    assert [e["batch"] for e in report["embed"]] == [1, 4]
    assert report["target"]["measured_p99_ms"] is None  # no row at the target size
    # The dtype comparison runs by default, on the same batch sizes as the rest.
    dtype_rows = report["encoder_dtypes"]["rows"]
    assert [(r["dtype"], r["batch"]) for r in dtype_rows] == [
        ("float32", 1),
        ("bfloat16", 1),
        ("float32", 4),
        ("bfloat16", 4),
    ]

    markdown = render_latency_markdown(report)
    assert "| flat | 300 | 4 |" in markdown
    assert "flat/hnsw search p50" in markdown
    assert "| bfloat16 | 4 |" in markdown and "p50 vs float32" in markdown
    out = write_latency_report(report, tmp_path)
    assert json.loads((out / "retrieval_latency.json").read_text()) == report
    assert (out / "retrieval_latency.md").read_text() == markdown


def test_target_verdict_reads_the_flat_single_query_row(encoder):
    report = run_latency(
        encoder,
        sizes=(TARGET_SIZE,),
        batch_sizes=(1,),
        queries=5,
        kinds=("flat",),
        min_calls=5,
        encoder_dtypes=(),
    )
    assert "encoder_dtypes" not in report  # an empty tuple skips the comparison
    target = report["target"]
    assert target["kind"] == "flat"
    assert target["measured_p99_ms"] == report["rows"][0]["total"]["p99_ms"]
    assert target["met"] == (target["measured_p99_ms"] <= 20.0)
    assert f"at {TARGET_SIZE:,} vectors (flat)" in render_latency_markdown(report)


def test_synthetic_store_is_clustered_and_labelled(encoder):
    vectors, tasks = synthetic_store(encoder, 50, seed=3)
    assert vectors.shape == (50, encoder.dim)
    texts, labels = synthetic_phrasings(50, seed=3)
    assert len(set(labels)) > 3 and len(texts) == 50
    # Noise keeps each vector near, not on, the phrasing it came from.
    base = encoder.encode(texts)
    best = (vectors @ base.T).max(axis=1)
    assert 0.45 < best.mean() < 0.8
    assert set(tasks) <= set(labels)


def test_compare_encoder_dtypes_against_float32(encoder):
    comparison = compare_encoder_dtypes(None, ("bfloat16",), batch_sizes=(1,), queries=8, min_calls=8)
    assert comparison["encoder"] == str(encoder.fingerprint)
    assert comparison["cpu_native_bf16"] == cpu_has_native_bf16()
    assert comparison["auto_dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    rows = {row["dtype"]: row for row in comparison["rows"]}
    assert list(rows) == ["float32", "bfloat16"]  # float32, the reference, is added and comes first
    assert rows["bfloat16"]["torch_dtype"] == "bfloat16" and rows["float32"]["torch_dtype"] == "float32"
    for row in rows.values():
        assert row["batch"] == 1 and row["calls"] == 8
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["p50_vs_float32"] == pytest.approx(row["p50_ms"] / rows["float32"]["p50_ms"])
    assert rows["float32"]["p50_vs_float32"] == 1.0
    assert rows["float32"]["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    # bfloat16 moves the vectors, but only a little.
    assert 0.999 < rows["bfloat16"]["min_cosine"] <= rows["bfloat16"]["mean_cosine"] < 1.0
