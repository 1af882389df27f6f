"""`taer bench store`: expert loading against the physical limit, pattern switches, memory saved.

1. Expert load throughput into slots vs a plain tensor copy of the same bytes (same source views,
   page cache warm): the ratio is what the store and cache cost over memcpy.
2. Pattern switch time against the fraction of changed experts: it should follow the diff.
3. Process memory with 25/50/100% of slots vs transformers loading the full model, each in a
   fresh child process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import best_of, machine_info, markdown_table, write_json
from benchmarks.synthetic import SyntheticShape, make_synthetic_checkpoint

logger = logging.getLogger(__name__)


def prepare_store(work: Path, shape: SyntheticShape) -> Path:
    from expert_store.manifest import MANIFEST_FILE
    from expert_store.shard import shard_checkpoint

    checkpoint = make_synthetic_checkpoint(work / "checkpoint", shape)
    store = work / "store"
    if not (store / MANIFEST_FILE).exists():
        shard_checkpoint(checkpoint, store, force=True)
    return store


def load_throughput(store_dir: Path, repeats: int = 3) -> dict:
    """GB/s moving half of each layer's experts into slots vs plain copies of the same bytes."""
    from expert_store.keys import ExpertKey
    from expert_store.runtime import RuntimeConfig, load_runtime

    runtime = load_runtime(store_dir, RuntimeConfig(slots_per_layer=runtime_half(store_dir)))
    layout, half = runtime.layout, runtime.num_slots
    first = {layer: list(range(half)) for layer in layout.moe_layers}
    second = {layer: list(range(half, 2 * half)) for layer in layout.moe_layers}
    verify_start = time.perf_counter()
    runtime.activate(first)  # cold: reads and checksums every expert once
    verified = runtime.activate(second)
    verify_seconds = time.perf_counter() - verify_start
    total = verified.bytes_loaded

    def swap_twice():
        runtime.activate(first)
        runtime.activate(second)

    load_seconds = best_of(swap_twice, repeats) / 2
    views = [runtime.store.expert(ExpertKey(layer, e)) for layer in layout.moe_layers for e in range(half, 2 * half)]
    targets = [(torch.empty_like(v.gate_up), torch.empty_like(v.down)) for v in views]

    def plain_copy():
        with runtime.cache.loader.session():  # the same threading as the loader: one copy each
            for view, (gate_up, down) in zip(views, targets, strict=True):
                gate_up.copy_(view.gate_up)
                down.copy_(view.down)

    plain_copy()
    copy_seconds = best_of(plain_copy, repeats)
    runtime.close()
    return {
        "bytes_per_swap": total,
        "load_gbps": total / load_seconds / 1e9,
        "plain_copy_gbps": total / copy_seconds / 1e9,
        "ratio": copy_seconds / load_seconds,
        "first_load_with_checksums_gbps": 2 * total / verify_seconds / 1e9,
    }


def runtime_half(store_dir: Path) -> int:
    from expert_store.manifest import Manifest

    return Manifest.load(store_dir).layout.num_experts // 2


def switch_times(store_dir: Path, fractions=(0.0, 0.125, 0.25, 0.5, 0.75, 1.0), repeats: int = 3) -> list[dict]:
    """Seconds to switch between two selections of half the experts that differ by ``fraction``."""
    from expert_store.runtime import RuntimeConfig, load_runtime

    half = runtime_half(store_dir)
    runtime = load_runtime(store_dir, RuntimeConfig(slots_per_layer=half))
    layers = runtime.layout.moe_layers
    base = list(range(half))
    rows = []
    for fraction in fractions:
        changed = round(fraction * half)
        other = base[changed:] + list(range(half, half + changed))
        a, b = {layer: base for layer in layers}, {layer: other for layer in layers}
        runtime.activate(a)
        runtime.activate(b)  # warm the page cache and checksums for both sides
        times, loaded = [], 0
        for _ in range(repeats):
            runtime.activate(a)
            start = time.perf_counter()
            report = runtime.activate(b)
            times.append(time.perf_counter() - start)
            loaded = report.loaded
        rows.append({"fraction_changed": fraction, "experts_loaded": loaded, "seconds": min(times)})
    runtime.close()
    full = rows[-1]["seconds"] or 1e-9
    for row in rows:
        row["relative_to_full_switch"] = row["seconds"] / full
    return rows


_CHILD = """
import json, sys, torch
from benchmarks.common import rss_breakdown
kind, path, slots = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
base = rss_breakdown()
if kind == "transformers":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    out = model(torch.tensor([[5, 6, 7]])).logits
else:
    from expert_store.runtime import RuntimeConfig, load_runtime
    runtime = load_runtime(path, RuntimeConfig(slots_per_layer=slots))
    runtime.activate({layer: list(range(slots)) for layer in runtime.layout.moe_layers})
    out = runtime.model(torch.tensor([[5, 6, 7]])).logits
    runtime.store.close()
print(json.dumps({"base": base, "after": rss_breakdown()}))
"""


def memory(store_dir: Path, checkpoint_dir: Path, fractions=(0.25, 0.5, 1.0)) -> list[dict]:
    """Resident memory of a fresh process per configuration (anonymous = allocated by the process)."""
    from expert_store.manifest import Manifest

    layout = Manifest.load(store_dir).layout
    configs = [("transformers (full model)", "transformers", str(checkpoint_dir), layout.num_experts)]
    configs += [(f"taer {f:.0%} slots", "taer", str(store_dir), max(layout.top_k, round(f * layout.num_experts)))
                for f in fractions]
    rows = []
    for label, kind, path, slots in configs:
        result = subprocess.run([sys.executable, "-c", _CHILD, kind, path, str(slots)],
                                capture_output=True, text=True, check=True)
        data = json.loads(result.stdout.strip().splitlines()[-1])
        anon = data["after"]["RssAnon"] - data["base"]["RssAnon"]
        total = data["after"]["VmRSS"] - data["base"]["VmRSS"]
        rows.append({"config": label, "slots_per_layer": slots, "rss_added_mb": total / 1e6,
                     "rss_anon_added_mb": anon / 1e6, "peak_rss_mb": data["after"]["VmHWM"] / 1e6})
    reference = rows[0]["rss_added_mb"]
    for row in rows:
        row["saved_vs_transformers_mb"] = reference - row["rss_added_mb"]
    return rows


def run(out_json: Path | None, work: Path, shape: SyntheticShape = SyntheticShape()) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    store = prepare_store(work, shape)
    result = {
        "machine": machine_info(),
        "shape": shape.__dict__ if hasattr(shape, "__dict__") else {f: getattr(shape, f) for f in shape.__slots__},
        "load": load_throughput(store),
        "switch": switch_times(store),
        "memory": memory(store, work / "checkpoint"),
    }
    write_json(out_json, result)
    print(render(result))
    return result


def render(result: dict) -> str:
    load = result["load"]
    parts = [
        "## Expert load throughput (same bytes, page cache warm)",
        markdown_table(
            ["path", "GB/s", "ratio vs plain copy"],
            [
                ["plain tensor copy (physical limit)", load["plain_copy_gbps"], 1.0],
                ["taer activate (slots, LRU, steady state)", load["load_gbps"], load["ratio"]],
                ["taer first load incl. xxh3 checksums", load["first_load_with_checksums_gbps"],
                 load["first_load_with_checksums_gbps"] / load["plain_copy_gbps"]],
            ],
        ),
        "\n## Pattern switch time vs fraction of experts changed (half the experts resident)",
        markdown_table(
            ["fraction changed", "experts loaded", "seconds", "relative to a full switch"],
            [[r["fraction_changed"], r["experts_loaded"], r["seconds"], r["relative_to_full_switch"]]
             for r in result["switch"]],
        ),
        "\n## Process memory (fresh process each; RSS added by loading and one forward pass)",
        markdown_table(
            ["config", "slots/layer", "RSS added MB", "of which anonymous MB", "peak RSS MB", "saved vs transformers MB"],
            [[r["config"], r["slots_per_layer"], r["rss_added_mb"], r["rss_anon_added_mb"], r["peak_rss_mb"],
              r["saved_vs_transformers_mb"]] for r in result["memory"]],
        ),
    ]
    return "\n".join(parts)


def add_arguments(parser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--work", type=Path, default=Path(".taer/bench-store"), help="synthetic checkpoint and store")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)


def main(args) -> int:
    shape = SyntheticShape(hidden=args.hidden, intermediate=args.intermediate, num_experts=args.experts,
                           num_layers=args.layers, top_k=min(8, args.experts // 2))
    work = args.work / f"h{shape.hidden}-i{shape.intermediate}-e{shape.num_experts}-l{shape.num_layers}"
    run(args.json, work, shape)
    return 0
