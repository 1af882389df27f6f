"""The routing record: a prompt's summed TCESS contributions equal what calibration's accumulator
computes from the same logits under the same thresholds; a record round-trips through its line;
reading skips a torn last line and lines that are not records."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import torch

from retrieval.routing_record import (
    RecordScan,
    RoutingRecord,
    ScoreRule,
    prompt_routing,
    read_records,
    record_file_name,
)
from retrieval.tcess import TaskStatsAccumulator


@pytest.mark.parametrize(
    ("rule", "accumulator"),
    [
        (ScoreRule(ka=2, top_k=2), dict(scoring="softmax")),
        (ScoreRule(ka=4, top_k=2), dict(ka=4, scoring="softmax")),
        (
            ScoreRule(3, 2, "sigmoid_bias", torch.linspace(-0.2, 0.2, 8).reshape(1, 8), 4, 2),
            dict(
                ka=3,
                scoring="sigmoid_bias",
                bias=torch.linspace(-0.2, 0.2, 8).reshape(1, 8),
                num_groups=4,
                topk_groups=2,
            ),
        ),
    ],
)
def test_prompt_sums_are_calibrations_tcess_times_tokens_under_the_same_threshold(rule, accumulator):
    torch.manual_seed(0)
    logits = 2 * torch.randn(30, 8)  # [t, E]: two prompts, 18 and 12 tokens
    prompt_of = torch.tensor([0] * 18 + [1] * 12)
    thresholds = torch.tensor([0.55] * 18 + [0.7] * 12)
    counts, sums = prompt_routing(logits, prompt_of, 2, thresholds, rule, layer=0)
    for prompt, (rows, threshold) in enumerate([(slice(0, 18), 0.55), (slice(18, 30), 0.7)]):
        reference = TaskStatsAccumulator(1, 8, top_k=2, **accumulator)
        reference.add(0, logits[rows])
        stats = reference.finalize(threshold=threshold)
        tokens = logits[rows].shape[0]
        torch.testing.assert_close(sums[prompt], stats.tcess[0] * tokens, rtol=1e-5, atol=1e-5)
        assert torch.equal(counts[prompt].double(), (stats.frequency[0].double() * tokens).round())
        assert int(counts[prompt].sum()) == 2 * tokens


def _record(request_id: str = "r1") -> RoutingRecord:
    counts = torch.tensor([[3, 0, 1], [0, 0, 4]])
    sums = torch.tensor([[1.25, 0.0, 0.5], [0.0, 0.125, 2.0]], dtype=torch.float64)
    return RoutingRecord(
        time=datetime(2026, 12, 3, 10, 0, 0, 123000, tzinfo=timezone.utc),
        request_id=request_id,
        task="add",
        mode="exact",
        num_tokens=2,
        counts=counts,
        tcess_sums=sums,
        prompt_sha256="ab" * 32,
        retrieval_sha256="cd" * 32,
        similarity=0.8,
        confidence=0.9,
        patterns="2026-12-02T17:54:35+00:00",
        prompt="<user>add 1 and 2\n<assistant>",
        retrieval_text="add 1 and 2",
    )


def test_a_record_round_trips_through_its_line():
    record = _record()
    line = record.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = RoutingRecord.from_json(json.loads(line))
    assert torch.equal(back.counts, record.counts) and torch.equal(back.tcess_sums, record.tcess_sums)
    assert (back.time, back.task, back.mode, back.num_tokens) == (record.time, "add", "exact", 2)
    assert (back.prompt, back.retrieval_text, back.patterns) == (
        record.prompt,
        "add 1 and 2",
        record.patterns,
    )


def test_reading_skips_a_torn_last_line_and_lines_that_are_not_records(tmp_path):
    first = tmp_path / record_file_name(1)
    first.write_bytes(_record("a").to_line() + b'{"v": 99}\n' + b"not json\n" + _record("b").to_line())
    second = tmp_path / record_file_name(2)
    second.write_bytes(_record("c").to_line() + _record("d").to_line()[:-20])  # the writer died mid-line
    (tmp_path / "notes.txt").write_text("ignored")
    scan = RecordScan()
    assert [r.request_id for r in read_records(tmp_path, scan)] == ["a", "b", "c"]
    assert scan.num_records == 3 and scan.num_skipped == 3 and scan.files == [first, second]
