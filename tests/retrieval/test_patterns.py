"""Pattern sets: bit-exact round trip, refusal of another model's patterns, clear errors."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import torch
from safetensors import safe_open

from expert_store.errors import PatternError, UnknownTaskError
from retrieval.patterns import PatternSet, build_pattern_set
from retrieval.selection import Budget
from retrieval.tcess import SuperExpert, TaskStatsAccumulator, pool

FINGERPRINT = "qwen3-moe-tiny:sha256:abc123"


def make_set(num_layers: int = 3, num_experts: int = 8) -> PatternSet:
    gen = torch.Generator().manual_seed(0)
    accs = {}
    for task, scale in (("math", 3.0), ("code", 0.7)):
        acc = TaskStatsAccumulator(num_layers, num_experts, top_k=2, ka=3)
        for layer in range(num_layers):
            acc.add(layer, torch.randn(25, num_experts, generator=gen) * scale)
        accs[task] = acc
    stats = {task: acc.finalize() for task, acc in accs.items()}
    return build_pattern_set(
        FINGERPRINT,
        stats,
        pool(list(accs.values())).finalize(),
        super_experts={"math": [SuperExpert(1, 5, 123.5, 2.25)]},
        always_keep={0: {7}},
        metadata={"encoder": "all-MiniLM-L6-v2"},
    )


def test_round_trip_is_bit_exact(tmp_path):
    original = make_set()
    original.save(tmp_path)
    loaded = PatternSet.load(tmp_path, expected_fingerprint=FINGERPRINT)

    assert loaded.tasks == ["math", "code"] and loaded.fingerprint == FINGERPRINT
    assert loaded.created == original.created and loaded.metadata == original.metadata
    assert loaded.always_keep == {0: frozenset({7})}
    for name in ("math", "code", "general"):
        a, b = original.get(name), loaded.get(name)
        for table in ("tcess", "frequency", "mean_prob", "thresholds"):
            x, y = getattr(a.stats, table), getattr(b.stats, table)
            assert x.dtype == y.dtype == torch.float32
            assert torch.equal(x.view(torch.int32), y.view(torch.int32)), f"{name}/{table} changed bits"
        assert b.stats.num_tokens == a.stats.num_tokens and b.stats.ka == 3 and b.stats.top_k == 2
        assert b.super_experts == a.super_experts
    assert loaded.get("general").stats.num_tokens == 50


def test_files_on_disk(tmp_path):
    make_set().save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patterns.json", "patterns.safetensors"]
    with safe_open(tmp_path / "patterns.safetensors", "pt") as f:
        assert set(f.keys()) == {
            f"{task}/{table}"
            for task in ("math", "code", "general")
            for table in ("tcess", "frequency", "mean_prob", "thresholds")
        }
    meta = json.loads((tmp_path / "patterns.json").read_text())
    assert meta["format_version"] == 1 and meta["fingerprint"] == FINGERPRINT
    assert meta["tasks"] == ["math", "code"] and meta["scoring"] == "softmax"
    assert (meta["top_k"], meta["ka"], meta["num_layers"], meta["num_experts"]) == (2, 3, 3, 8)
    assert meta["patterns"]["math"]["num_tokens"] == 25 and len(meta["patterns"]["code"]["thresholds"]) == 3
    assert meta["patterns"]["math"]["super_experts"] == [
        {"layer": 1, "expert": 5, "max_abs": 123.5, "layer_median": 2.25}
    ]
    assert meta["always_keep"] == {"0": [7]}
    assert datetime.fromisoformat(meta["created"]).utcoffset().total_seconds() == 0


def test_refuses_another_models_patterns(tmp_path):
    make_set().save(tmp_path)
    with pytest.raises(PatternError) as error:
        PatternSet.load(tmp_path, expected_fingerprint="mixtral-tiny:sha256:def456")
    message = str(error.value)
    assert FINGERPRINT in message and "mixtral-tiny:sha256:def456" in message and "taer calibrate" in message


def test_unknown_task_lists_known_tasks():
    with pytest.raises(UnknownTaskError, match="'poetry'; known tasks: math, code, general"):
        make_set().get("poetry")


def test_missing_or_malformed_directory(tmp_path):
    with pytest.raises(PatternError, match=r"patterns\.json missing"):
        PatternSet.load(tmp_path / "nowhere")
    make_set().save(tmp_path)
    meta_path = tmp_path / "patterns.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text("{not json")
    with pytest.raises(PatternError, match="not valid JSON"):
        PatternSet.load(tmp_path)
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(PatternError, match="format version 99"):
        PatternSet.load(tmp_path)
    meta_path.write_text(
        json.dumps({**meta, "patterns": {**meta["patterns"], "poetry": meta["patterns"]["math"]}})
    )
    with pytest.raises(PatternError, match="lacks poetry/tcess"):
        PatternSet.load(tmp_path)
    meta_path.write_text(json.dumps({**meta, "always_keep": None}))
    with pytest.raises(PatternError, match="malformed"):
        PatternSet.load(tmp_path)
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "patterns.safetensors").write_bytes(b"garbage")
    with pytest.raises(PatternError, match="cannot be read"):
        PatternSet.load(tmp_path)


def test_a_set_needs_general_and_consistent_settings():
    good = make_set()
    with pytest.raises(PatternError, match="'general'"):
        PatternSet(FINGERPRINT, {"math": good.get("math")})
    other = make_set(num_experts=4).get("code")
    with pytest.raises(PatternError, match="settings"):
        PatternSet(FINGERPRINT, {"general": good.general, "code": other})


def test_select_retains_super_experts_and_always_keep():
    patterns = make_set()
    assert patterns.required_experts() == {0: frozenset({7}), 1: frozenset({5})}
    selection = patterns.select("math", Budget(experts_per_layer=2), always_keep={2: {3}})
    assert 7 in selection.experts(0) and 5 in selection.experts(1) and 3 in selection.experts(2)
    assert all(len(selection.experts(layer)) == 2 for layer in range(3))
