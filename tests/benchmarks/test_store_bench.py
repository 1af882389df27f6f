"""Smoke test of `taer bench store` at tiny shapes on the CPU: every section but memory (a child
process per configuration), including the ones written for CUDA (load vs plain copy, decoding)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.store import StoreBenchOptions, render, run, seconds_of
from benchmarks.synthetic import SyntheticShape
from expert_store.errors import TaerError
from server.cli import main as taer

SHAPE = SyntheticShape(hidden=64, intermediate=32, num_experts=8, num_layers=2, top_k=2, vocab=128)
OPTIONS = StoreBenchOptions(
    sections=("load", "switch", "decode", "dtypes"), repeats=2, prompt_tokens=6, new_tokens=5
)
EXPERT_BYTES = 3 * 64 * 32 * 2  # bfloat16


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    # One thread: on a small shared CPU, OpenMP threads waiting for busy cores are many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench-store")
    try:
        out = run(root / "store.json", root / "work", SHAPE, OPTIONS)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((root / "store.json").read_text()) == json.loads(json.dumps(out, default=str))
    return out


def test_load_section_compares_with_a_plain_copy_of_the_same_bytes(result):
    load = result["load"]
    assert load["device"] == "cpu"
    assert load["bytes_per_swap"] == SHAPE.num_layers * 4 * EXPERT_BYTES  # half of 8 experts per layer
    assert load["load_gbps"] > 0 and load["plain_copy_gbps"] > 0
    assert load["ratio"] == pytest.approx(load["load_gbps"] / load["plain_copy_gbps"])
    assert "pageable_copy_gbps" not in load  # a CUDA-only comparison


def test_switch_section_loads_exactly_the_difference(result):
    rows = result["switch"]
    assert [r["experts_loaded"] for r in rows] == [
        round(r["fraction_changed"] * 4) * SHAPE.num_layers for r in rows
    ]
    assert rows[-1]["relative_to_full_switch"] == 1.0


def test_decode_section_compares_pruned_half_with_all_experts(result):
    decode = result["decode"]
    full, pruned = decode["rows"]
    assert (full["slots_per_layer"], pruned["slots_per_layer"]) == (8, 4)
    assert full["expert_bytes_resident"] == 2 * pruned["expert_bytes_resident"] == 2 * 8 * EXPERT_BYTES
    assert decode["pruned_vs_full_expert_bytes"] == 0.5
    for row in (full, pruned):
        assert row["generated_tokens"] == OPTIONS.new_tokens + 1  # the timed run: prefill token + decode
        assert row["decode_tokens_per_s"] > 0 and row["prefill_seconds"] > 0
    ratio = pruned["decode_tokens_per_s"] / full["decode_tokens_per_s"]
    assert decode["pruned_vs_full_tokens_per_s"] == pytest.approx(ratio)


def test_dtypes_section_puts_8_bit_experts_beside_bfloat16(result):
    dtypes = result["dtypes"]
    rows = {row["expert_dtype"]: row for row in dtypes["rows"]}
    assert list(rows) == ["bfloat16", "int8", "float8"] and dtypes["compute_dtype"] == "bfloat16"
    assert rows["bfloat16"]["bytes_per_expert"] == EXPERT_BYTES
    assert [rows[n]["slots_hold"] for n in rows] == ["bfloat16", "int8-channel", "float8-channel"]
    scales = 4 * (2 * 32 + 64)  # float32, one per output row of gate_up [64, 64] and down [64, 32]
    for name in ("int8", "float8"):
        assert rows[name]["bytes_per_expert"] == EXPERT_BYTES // 2 + scales
        assert rows[name]["bytes_vs_bfloat16"] == pytest.approx(rows[name]["bytes_per_expert"] / EXPERT_BYTES)
        assert 0 < rows[name]["max_logit_diff_vs_bfloat16"] < 1.0  # 8-bit weights: close, not equal
    for row in rows.values():
        assert row["decode_tokens_per_s"] > 0
        assert row["tokens_per_s_vs_bfloat16"] == pytest.approx(
            row["decode_tokens_per_s"] / rows["bfloat16"]["decode_tokens_per_s"]
        )


def test_render_has_a_table_per_section(result):
    text = render(result)
    assert "# Expert store on cpu" in text
    for title in ("Expert load throughput", "Pattern switch time", "Greedy decoding", "Expert dtypes"):
        assert title in text
    assert "Process memory" not in text
    assert "| pruned keep=50% | 4 |" in text


def test_seconds_of_times_the_function_on_the_cpu():
    calls = []
    assert 0 <= seconds_of(lambda: calls.append(1), torch.device("cpu")) < 1
    assert calls == [1]


def test_bad_options_are_refused():
    with pytest.raises(TaerError, match="unknown sections"):
        StoreBenchOptions(sections=("load", "speed"))
    with pytest.raises(TaerError, match="at least 1"):
        StoreBenchOptions(new_tokens=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_one_line_error(tmp_path, capsys):
    code = taer(["bench", "store", "--device", "cuda", "--work", str(tmp_path), "--experts", "8"])
    assert code == 2
    assert "no CUDA device" in capsys.readouterr().err
