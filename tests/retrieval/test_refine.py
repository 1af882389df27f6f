"""`taer calibrate --refine`: a pattern's TCESS and frequency move toward its recorded requests'
routing by exactly the weight given, and nothing else changes; records made before the patterns,
of pruned mode (unless asked) or of the full model are not used; the directory is replaced
atomically, its index and router check profile carried over; fallback requests' texts can become
a proposed task."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import torch
from pipeline import build_pipeline
from record_helpers import routing_record

from expert_store.errors import PatternError
from retrieval.calibrate import load_patterns_for_store
from retrieval.discover import DiscoveryOptions
from retrieval.patterns import PatternSet
from retrieval.refine import RefineOptions, propose_tasks, refine_patterns
from retrieval.router_check import PROFILE_FILE
from retrieval.routing_record import record_file_name
from server.cli import main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("refine"))


@pytest.fixture
def patterns(pipeline, tmp_path):
    """A copy of the pipeline's patterns, to refine in place."""
    import shutil

    copy = tmp_path / "patterns"
    shutil.copytree(pipeline[1], copy)
    return copy


def _write(directory, records) -> None:
    directory.mkdir(exist_ok=True)
    (directory / record_file_name(1)).write_bytes(b"".join(record.to_line() for record in records))


def _random_routing(shape, seed: int, tokens: int):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, shape, generator=generator)
    sums = torch.rand(shape, generator=generator, dtype=torch.float64) * 3
    return counts, sums, tokens


def test_refine_moves_a_task_toward_its_recorded_routing_by_the_weight(pipeline, patterns, tmp_path):
    store, _ = pipeline
    before = load_patterns_for_store(patterns, store)
    shape = tuple(before.general.stats.tcess.shape)
    served = [_random_routing(shape, seed, 20 + seed) for seed in range(3)]
    old = datetime.now(timezone.utc) - timedelta(days=1)
    _write(
        tmp_path / "records",
        [
            *(routing_record(f"a{i}", c, s, n, task="arithmetic") for i, (c, s, n) in enumerate(served)),
            routing_record("old", *served[0], task="arithmetic", time=old),  # before the patterns
            routing_record("pruned", *served[0], task="arithmetic", mode="pruned"),
            routing_record("full", *served[0], task=None, mode="full"),
            routing_record("r0", *served[1], task="reverse"),  # too few for reverse
        ],
    )
    options = RefineOptions(weight=0.3, min_requests=2)
    result = refine_patterns(patterns, tmp_path / "records", store, options)
    after = load_patterns_for_store(patterns, store)
    assert result.refined == ["arithmetic"] and result.routing["arithmetic"].num_requests == 3
    assert sum(result.unused.values()) == 3 and result.scan.num_records == 7
    tokens = sum(n for _, _, n in served)
    recorded_tcess = sum(s for _, s, _ in served) / tokens
    recorded_frequency = sum(c for c, _, _ in served).double() / tokens
    old_stats, new_stats = before.get("arithmetic").stats, after.get("arithmetic").stats
    expected = (0.7 * old_stats.tcess.double() + 0.3 * recorded_tcess).float()
    torch.testing.assert_close(new_stats.tcess, expected)
    torch.testing.assert_close(
        new_stats.frequency, (0.7 * old_stats.frequency.double() + 0.3 * recorded_frequency).float()
    )
    assert torch.equal(new_stats.thresholds, old_stats.thresholds)  # the s~ were computed with these
    assert torch.equal(new_stats.mean_prob, old_stats.mean_prob)
    assert new_stats.num_tokens == old_stats.num_tokens + tokens
    for name in ("reverse", "general"):
        assert torch.equal(after.get(name).stats.tcess, before.get(name).stats.tcess)
    assert after.created >= before.created and after.metadata["refinements"][0]["requests"] == {
        "arithmetic": 3
    }

    # A second refinement with the same records finds them older than the refined patterns.
    again = refine_patterns(patterns, tmp_path / "records", store, options)
    assert again.refined == [] and again.unused["recorded before these patterns were made"] >= 1


def test_pruned_requests_count_when_asked_and_weight_zero_changes_nothing(pipeline, patterns, tmp_path):
    store, _ = pipeline
    before = load_patterns_for_store(patterns, store)
    shape = tuple(before.general.stats.tcess.shape)
    _write(
        tmp_path / "records",
        [routing_record("p", *_random_routing(shape, 7, 30), mode="pruned", task="reverse")],
    )
    result = refine_patterns(
        patterns, tmp_path / "records", store, RefineOptions(0.0, 1, include_pruned=True)
    )
    assert result.refined == ["reverse"]
    after = load_patterns_for_store(patterns, store)
    assert torch.equal(after.get("reverse").stats.tcess, before.get("reverse").stats.tcess)


def test_refined_patterns_replace_the_directory_atomically(pipeline, patterns, tmp_path, monkeypatch):
    store, _ = pipeline
    shape = tuple(load_patterns_for_store(patterns, store).general.stats.tcess.shape)
    records = [routing_record(f"a{i}", *_random_routing(shape, i, 9), task="arithmetic") for i in range(2)]
    records += [routing_record(f"r{i}", *_random_routing(shape, i, 9), task="reverse") for i in range(2)]
    _write(tmp_path / "records", records)
    files = sorted(p.relative_to(patterns) for p in patterns.rglob("*"))
    index_bytes = (patterns / "index" / "index.faiss").read_bytes()
    before = (patterns / "patterns.json").read_bytes()

    def broken(self, directory):
        (directory / "patterns.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(PatternSet, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        refine_patterns(patterns, tmp_path / "records", store, RefineOptions(min_requests=1))
    assert (patterns / "patterns.json").read_bytes() == before
    assert [p.name for p in patterns.parent.iterdir() if p.name.startswith(".")] == []  # no leftovers
    monkeypatch.undo()

    refine_patterns(patterns, tmp_path / "records", store, RefineOptions(min_requests=1))
    assert (patterns / "patterns.json").read_bytes() != before
    assert sorted(p.relative_to(patterns) for p in patterns.rglob("*")) == files
    assert (patterns / "index" / "index.faiss").read_bytes() == index_bytes and (
        patterns / PROFILE_FILE
    ).is_file()


def test_refine_refuses_records_it_cannot_use_and_the_wrong_tasks_file(pipeline, patterns, tmp_path):
    store, _ = pipeline
    with pytest.raises(PatternError, match="no record directory"):
        refine_patterns(patterns, tmp_path / "missing", store)
    other = tmp_path / "other.yaml"
    (other).write_text("tasks:\n  math: m.txt\n")
    (tmp_path / "m.txt").write_text("1+1\n")
    (tmp_path / "records").mkdir()
    with pytest.raises(PatternError, match="give the tasks file they were calibrated from"):
        refine_patterns(patterns, tmp_path / "records", store, tasks_file=other)
    with pytest.raises(PatternError, match="must lie in"):
        RefineOptions(weight=1.5)


def test_the_cli_refines_and_proposes_a_task_from_fallback_texts(pipeline, patterns, tmp_path, capsys):
    store, _ = pipeline
    shape = tuple(load_patterns_for_store(patterns, store).general.stats.tcess.shape)
    words = [
        f"{colour} {thing}"
        for colour in ("red", "blue", "green", "old")
        for thing in ("apple", "river", "stone")
    ]
    fallback = [f"Translate the word '{w}' into French." for w in words]
    _write(
        tmp_path / "records",
        [
            routing_record(f"g{i}", *_random_routing(shape, i, 12), task="general", text=t)
            for i, t in enumerate(fallback)
        ],
    )
    tasks = store.parent / "tasks" / "tasks.yaml"
    proposal = tmp_path / "proposed" / "tasks.yaml"
    argv = [
        "calibrate",
        str(store),
        str(tasks),
        "--out",
        str(patterns),
        "--refine",
        str(tmp_path / "records"),
    ]
    argv += ["--refine-weight", "0.25", "--propose-tasks", str(proposal), "--propose-min-size", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| general | 12 |" in printed and "refined general (weight 0.25)" in printed
    assert "proposed task(s)" in printed
    written = json.loads((proposal.parent / "tasks_prompts" / "discovery.json").read_text())
    assert written["prompts"] == 12 and sum(task["size"] for task in written["tasks"]) >= 6
    assert propose_tasks([], proposal, DiscoveryOptions(min_size=6)) is None
