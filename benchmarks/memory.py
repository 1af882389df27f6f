"""Memory at keep 100/50/25% (part 3 of `taer bench all`): resident expert bytes and process RSS.

Each configuration loads in a fresh child process (so one's allocations never count for another),
activates a pattern that fills its slots, runs one forward pass and reports its resident memory.
The reference is transformers loading the plain checkpoint, when one is given.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import markdown_table

_CHILD = """
import json, sys, torch
from benchmarks.common import rss_breakdown
spec = json.loads(sys.argv[1])
torch.set_num_threads(1)
base = rss_breakdown()
ids = torch.tensor([[5, 6, 7, 8]])
if spec["kind"] == "transformers":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype="auto")
    model(ids)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = {"resident_expert_bytes": None, "expert_capacity_bytes": None, "model_bytes": params}
else:
    from expert_store.runtime import RuntimeConfig, load_runtime
    runtime = load_runtime(spec["path"], RuntimeConfig(slots_per_layer=spec["slots"]))
    selection = spec["selection"] or {str(l): list(range(spec["slots"])) for l in runtime.layout.moe_layers}
    runtime.activate({int(l): e for l, e in selection.items()}, "pruned")
    runtime.model(ids)
    cache = runtime.cache
    extra = {"resident_expert_bytes": cache.resident_bytes, "expert_capacity_bytes": cache.capacity_bytes,
             "model_bytes": runtime.dense_bytes}
print(json.dumps({"base": base, "after": rss_breakdown(), **extra}))
"""


def measure_child(spec: dict) -> dict:
    """Run the child for one configuration; its last stdout line is the JSON result."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory child for {spec['kind']} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def general_selection(patterns_dir: Path | None, store_dir: Path, slots: int) -> dict[str, list[int]] | None:
    """The ``general`` pattern at ``slots`` experts per layer (what a fresh server holds), or None."""
    if patterns_dir is None:
        return None
    from retrieval.calibrate import load_patterns_for_store
    from retrieval.selection import Budget
    from retrieval.service import PatternRouter

    router = PatternRouter(load_patterns_for_store(patterns_dir, store_dir), Budget(experts_per_layer=slots))
    return {str(layer): list(experts) for layer, experts in router.selection("general").items()}


def run_memory(
    store_dir: Path,
    patterns_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    keeps: Sequence[float] = (1.0, 0.5, 0.25),
) -> dict:
    """One row per configuration, with ratios to keep 100%; JSON-ready."""
    from benchmarks.policies import slots_for
    from expert_store.manifest import Manifest

    layout = Manifest.load(store_dir).layout
    rows = []
    if checkpoint_dir is not None:
        data = measure_child({"kind": "transformers", "path": str(checkpoint_dir)})
        rows.append(_row("transformers, plain checkpoint", None, None, data))
    for keep in keeps:
        slots = slots_for(keep, layout.num_experts, layout.top_k)
        spec = {
            "kind": "taer",
            "path": str(store_dir),
            "slots": slots,
            "selection": general_selection(patterns_dir, store_dir, slots),
        }
        rows.append(_row(f"taer keep {keep:.0%}", keep, slots, measure_child(spec)))
    full = next(r for r in rows if r["keep"] == max(keeps))
    for row in rows:
        if row["resident_expert_bytes"] is not None:
            row["experts_vs_keep_100"] = row["resident_expert_bytes"] / full["resident_expert_bytes"]
        row["rss_vs_keep_100"] = row["rss_bytes"] / full["rss_bytes"]
    return {"layout": layout.to_json(), "rows": rows}


def _row(config: str, keep: float | None, slots: int | None, data: dict) -> dict:
    after, base = data["after"], data["base"]
    return {
        "config": config,
        "keep": keep,
        "slots_per_layer": slots,
        "resident_expert_bytes": data["resident_expert_bytes"],
        "expert_capacity_bytes": data["expert_capacity_bytes"],
        "model_bytes": data["model_bytes"],
        "rss_bytes": after["VmRSS"],
        "rss_added_bytes": after["VmRSS"] - base["VmRSS"],
        "rss_anon_added_bytes": after["RssAnon"] - base["RssAnon"],
        "peak_rss_bytes": after["VmHWM"],
    }


def render(result: dict) -> str:
    layout = result["layout"]

    def mb(value) -> str:
        return "-" if value is None else f"{value / 1e6:.1f}"

    def ratio(row, key) -> str:
        return f"{row[key]:.2f}x" if row.get(key) is not None else "-"

    rows = [
        [
            r["config"],
            r["slots_per_layer"] or "-",
            mb(r["resident_expert_bytes"]),
            ratio(r, "experts_vs_keep_100"),
            mb(r["model_bytes"]),
            mb(r["rss_bytes"]),
            ratio(r, "rss_vs_keep_100"),
            mb(r["rss_added_bytes"]),
            mb(r["rss_anon_added_bytes"]),
        ]
        for r in result["rows"]
    ]
    return (
        f"{len(layout['moe_layers'])} MoE layers x {layout['num_experts']} experts; each configuration in a fresh "
        'process after loading and one forward pass. "Dense MB" is every parameter outside the expert slots '
        "(for transformers: the whole model).\n\n"
        + markdown_table(
            [
                "config",
                "slots/layer",
                "resident expert MB",
                "experts vs 100%",
                "dense MB",
                "process RSS MB",
                "RSS vs 100%",
                "RSS added by loading MB",
                "of which anonymous MB",
            ],
            rows,
        )
    )
