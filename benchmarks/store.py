"""`taer bench store`: expert loading against the physical limit, pattern switches, memory, decoding.

On a synthetic checkpoint with a real model's expert shapes, on the CPU or a CUDA device:
1. load: expert load throughput into slots vs a plain copy of the same bytes (page cache warm). On
   the CPU the plain copy is a tensor copy; on CUDA it is a pinned-host-to-device copy, the
   physical limit of the link, and both are timed with CUDA events. The ratio is what the store,
   the cache and the staging through pinned buffers cost.
2. switch: pattern switch time against the fraction of changed experts: it should follow the diff.
3. memory: process memory with 25/50/100% of slots vs transformers loading the full model, each in a
   fresh child process (host memory, CPU runtime).
4. decode: greedy decoding tokens/s from random prompt ids, pruned to half the experts of every
   layer (half the slots) vs every expert resident.
5. dtypes: the same checkpoint's experts stored as bfloat16, int8 and float8 (``taer shard
   --expert-dtype``), every expert resident, computing in bfloat16: bytes per expert in a slot,
   decode tokens/s (the arms interleaved round by round, best of ``repeats``), and the largest logit
   difference to the bfloat16 store on the prompt.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import machine_info, markdown_table, write_json
from benchmarks.synthetic import SyntheticShape, make_synthetic_checkpoint
from expert_store.errors import TaerError

logger = logging.getLogger(__name__)

SECTIONS = ("load", "switch", "memory", "decode", "dtypes")
CUDA_SECTIONS = ("load", "switch", "decode", "dtypes")  # "memory" measures the host process, a CPU matter
EXPERT_DTYPES = ("bfloat16", "int8", "float8")


@dataclasses.dataclass(frozen=True, slots=True)
class StoreBenchOptions:
    """Where and what to run; ``prompt_tokens``, ``new_tokens`` and ``batch`` size the decoding section."""

    device: str = "cpu"
    sections: tuple[str, ...] = SECTIONS
    repeats: int = 3
    prompt_tokens: int = 32
    new_tokens: int = 32
    batch: int = 1

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise TaerError(f"unknown sections {unknown}; choose among {', '.join(SECTIONS)}")
        if min(self.repeats, self.prompt_tokens, self.new_tokens, self.batch) < 1:
            raise TaerError("repeats, prompt tokens, new tokens and batch must be at least 1")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise TaerError(f"--device {self.device}: this torch build or machine has no CUDA device")


def prepare_store(work: Path, shape: SyntheticShape) -> Path:
    from expert_store.manifest import MANIFEST_FILE
    from expert_store.shard import shard_checkpoint

    checkpoint = make_synthetic_checkpoint(work / "checkpoint", shape)
    store = work / "store"
    if not (store / MANIFEST_FILE).exists():
        shard_checkpoint(checkpoint, store, force=True)
    return store


# Timing -------------------------------------------------------------------------------------------


def seconds_of(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``fn`` including the device work it queued. On CUDA, events on the current
    stream: the end event cannot complete before the copies ``fn`` waited for, nor before the host
    issued them, so host staging is counted too."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)
    stream = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` runs (noise only adds time)."""
    return min(seconds_of(fn, device) for _ in range(repeats))


def release(device: torch.device) -> None:
    """Return the memory of runtimes already dropped, so that sections do not crowd each other."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# 1. Load throughput -------------------------------------------------------------------------------


def load_throughput(store_dir: Path, repeats: int = 3, device: str = "cpu") -> dict:
    """GB/s moving half of each layer's experts into slots vs plain copies of the same bytes."""
    from expert_store.keys import ExpertKey
    from expert_store.runtime import RuntimeConfig, load_runtime

    device = torch.device(device)
    runtime = load_runtime(
        store_dir, RuntimeConfig(device=str(device), slots_per_layer=runtime_half(store_dir))
    )
    layout, half = runtime.layout, runtime.num_slots
    first = {layer: list(range(half)) for layer in layout.moe_layers}
    second = {layer: list(range(half, 2 * half)) for layer in layout.moe_layers}
    reports = []  # cold: read and checksum every expert once
    verify_seconds = seconds_of(
        lambda: reports.extend([runtime.activate(first), runtime.activate(second)]), device
    )
    total = reports[-1].bytes_loaded

    def swap_twice():
        runtime.activate(first)
        runtime.activate(second)

    load_seconds = best_seconds(swap_twice, device, repeats) / 2
    views = [
        runtime.store.expert(ExpertKey(layer, e))
        for layer in layout.moe_layers
        for e in range(half, 2 * half)
    ]
    sources = [(v.gate_up, v.down) for v in views]
    result = {"device": str(device), "bytes_per_swap": total, "load_gbps": total / load_seconds / 1e9}
    if device.type == "cuda":
        pinned = [(g.pin_memory(), d.pin_memory()) for g, d in sources]
        result["plain_copy"] = "pinned host -> device, non-blocking, one stream"
        result["plain_copy_gbps"] = total / best_seconds(plain_copies(pinned, device), device, repeats) / 1e9
        result["pageable_copy_gbps"] = (
            total / best_seconds(plain_copies(sources, device), device, repeats) / 1e9
        )
        del pinned
    else:
        with runtime.cache.loader.session():  # the same threading as the loader: one copy each
            copy = plain_copies(sources, device)
            copy()
            result["plain_copy"] = "tensor copy from the store's memory map"
            result["plain_copy_gbps"] = total / best_seconds(copy, device, repeats) / 1e9
    result["ratio"] = result["load_gbps"] / result["plain_copy_gbps"]
    result["first_load_with_checksums_gbps"] = 2 * total / verify_seconds / 1e9
    runtime.close()
    return result


def plain_copies(
    sources: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> Callable[[], None]:
    """A function copying every (gate_up, down) of ``sources`` into buffers of its own on ``device``
    (non-blocking from pinned memory)."""
    targets = [(torch.empty_like(g, device=device), torch.empty_like(d, device=device)) for g, d in sources]

    def copy() -> None:
        for (gate_up, down), (gate_up_out, down_out) in zip(sources, targets, strict=True):
            gate_up_out.copy_(gate_up, non_blocking=gate_up.is_pinned())
            down_out.copy_(down, non_blocking=down.is_pinned())

    return copy


def runtime_half(store_dir: Path) -> int:
    from expert_store.manifest import Manifest

    return Manifest.load(store_dir).layout.num_experts // 2


# 2. Switch time -----------------------------------------------------------------------------------


def switch_times(
    store_dir: Path, fractions=(0.0, 0.125, 0.25, 0.5, 0.75, 1.0), repeats: int = 3, device: str = "cpu"
) -> list[dict]:
    """Seconds to switch between two selections of half the experts that differ by ``fraction``."""
    from expert_store.runtime import RuntimeConfig, load_runtime

    device = torch.device(device)
    half = runtime_half(store_dir)
    runtime = load_runtime(store_dir, RuntimeConfig(device=str(device), slots_per_layer=half))
    layers = runtime.layout.moe_layers
    base = list(range(half))
    rows = []
    for fraction in fractions:
        changed = round(fraction * half)
        other = base[changed:] + list(range(half, half + changed))
        a, b = {layer: base for layer in layers}, {layer: other for layer in layers}
        runtime.activate(a)
        runtime.activate(b)  # warm the page cache and checksums for both sides
        times, loaded = [], []
        for _ in range(repeats):
            runtime.activate(a)
            times.append(seconds_of(lambda b=b, out=loaded: out.append(runtime.activate(b).loaded), device))
        rows.append({"fraction_changed": fraction, "experts_loaded": loaded[-1], "seconds": min(times)})
    runtime.close()
    full = rows[-1]["seconds"] or 1e-9
    for row in rows:
        row["relative_to_full_switch"] = row["seconds"] / full
    return rows


# 3. Memory ----------------------------------------------------------------------------------------

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
    configs += [
        (f"taer {f:.0%} slots", "taer", str(store_dir), max(layout.top_k, round(f * layout.num_experts)))
        for f in fractions
    ]
    rows = []
    for label, kind, path, slots in configs:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, kind, path, str(slots)], capture_output=True, text=True, check=True
        )
        data = json.loads(result.stdout.strip().splitlines()[-1])
        anon = data["after"]["RssAnon"] - data["base"]["RssAnon"]
        total = data["after"]["VmRSS"] - data["base"]["VmRSS"]
        rows.append(
            {
                "config": label,
                "slots_per_layer": slots,
                "rss_added_mb": total / 1e6,
                "rss_anon_added_mb": anon / 1e6,
                "peak_rss_mb": data["after"]["VmHWM"] / 1e6,
            }
        )
    reference = rows[0]["rss_added_mb"]
    for row in rows:
        row["saved_vs_transformers_mb"] = reference - row["rss_added_mb"]
    return rows


# 4. Decoding --------------------------------------------------------------------------------------


def decode_speed(store_dir: Path, options: StoreBenchOptions) -> dict:
    """Greedy decoding tokens/s, pruned to a random half of every layer's experts vs all resident."""
    from expert_store.manifest import Manifest
    from expert_store.runtime import RuntimeConfig, load_runtime

    device, layout = torch.device(options.device), Manifest.load(store_dir).layout
    half, rng = runtime_half(store_dir), random.Random(0)
    pruned = {layer: sorted(rng.sample(range(layout.num_experts), half)) for layer in layout.moe_layers}
    configs = [("all experts resident", layout.num_experts, None), ("pruned keep=50%", half, pruned)]
    rows = []
    for label, slots, selection in configs:
        runtime = load_runtime(store_dir, RuntimeConfig(device=str(device), slots_per_layer=slots))
        if selection is None:
            runtime.activate_all()
        else:
            runtime.activate(selection, "pruned")
        row = {
            "config": label,
            "slots_per_layer": slots,
            "expert_bytes_resident": runtime.cache.resident_bytes,
        }
        rows.append(row | generation_speed(runtime, options))
        runtime.close()
        del runtime
        release(device)
    full, cut = rows
    return {
        "prompt_tokens": options.prompt_tokens,
        "new_tokens": options.new_tokens,
        "batch": options.batch,
        "rows": rows,
        "pruned_vs_full_tokens_per_s": cut["decode_tokens_per_s"] / full["decode_tokens_per_s"],
        "pruned_vs_full_expert_bytes": cut["expert_bytes_resident"] / full["expert_bytes_resident"],
    }


def generation_speed(runtime, options: StoreBenchOptions) -> dict:
    """Prefill seconds and decode tokens/s of greedy generation; the best of ``repeats`` runs.

    A logits processor stamps the time of every generated token (after synchronising the device),
    so decoding is timed from the first token to the last within one run.
    """
    device = torch.device(options.device)
    generator = torch.Generator().manual_seed(0)
    vocab = runtime.model.config.vocab_size
    ids = torch.randint(3, vocab, (options.batch, options.prompt_tokens), generator=generator).to(device)
    _timed_generation(runtime, ids, 2, device)  # warm-up: kernels, allocator, caches
    runs = [_timed_generation(runtime, ids, 1 + options.new_tokens, device) for _ in range(options.repeats)]
    prefill = min(r["prefill_seconds"] for r in runs)
    decode = min(r["decode_seconds"] for r in runs)
    return {
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "generated_tokens": runs[-1]["generated_tokens"],
        "decode_tokens_per_s": options.batch * options.new_tokens / decode,
    }


def _timed_generation(runtime, ids: torch.Tensor, new_tokens: int, device: torch.device) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class TokenClock(LogitsProcessor):
        """Stamps the time each token's logits are ready; changes nothing."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.stamps.append(time.perf_counter())
            return scores

    clock = TokenClock()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = runtime.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        logits_processor=LogitsProcessorList([clock]),
    )
    return {
        "prefill_seconds": clock.stamps[0] - start,
        "decode_seconds": clock.stamps[-1] - clock.stamps[0],
        "generated_tokens": out.shape[1] - ids.shape[1],
    }


# 5. Expert dtypes --------------------------------------------------------------------------------


def dtype_speed(checkpoint: Path, source_store: Path, options: StoreBenchOptions) -> dict:
    """Decode tokens/s and slot bytes with the experts stored as each of EXPERT_DTYPES, side by side
    (a bfloat16 ``source_store`` serves as the bfloat16 arm; the others are sharded beside it)."""
    from expert_store.manifest import MANIFEST_FILE, Manifest
    from expert_store.runtime import RuntimeConfig, load_runtime
    from expert_store.shard import shard_checkpoint

    device = torch.device(options.device)
    source = Manifest.load(source_store)
    runtimes = {}
    for expert_dtype in EXPERT_DTYPES:
        store = source_store.with_name(f"store-{expert_dtype}")
        if expert_dtype == source.dtype and source.expert_scheme == "none":
            store = source_store
        elif not (store / MANIFEST_FILE).exists():
            shard_checkpoint(checkpoint, store, force=True, expert_dtype=expert_dtype)
        runtime = load_runtime(store, RuntimeConfig(device=str(device), dtype="bfloat16"))
        runtime.activate_all()
        runtimes[expert_dtype] = runtime
    generator = torch.Generator().manual_seed(0)
    vocab = runtimes["bfloat16"].model.config.vocab_size
    ids = torch.randint(3, vocab, (options.batch, options.prompt_tokens), generator=generator).to(device)
    logits = {}
    for name, runtime in runtimes.items():
        with torch.inference_mode():
            logits[name] = runtime.model(ids).logits.float()
        _timed_generation(runtime, ids, 2, device)  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name in runtimes}
    for _ in range(options.repeats):  # interleaved: each round runs every arm once
        for name, runtime in runtimes.items():
            runs[name].append(_timed_generation(runtime, ids, 1 + options.new_tokens, device))
    rows = []
    for name, runtime in runtimes.items():
        decode = min(r["decode_seconds"] for r in runs[name])
        bank = next(iter(runtime.cache.banks.values()))
        rows.append(
            {
                "expert_dtype": name,
                "slots_hold": runtime.expert_dtype,
                "bytes_per_expert": bank.nbytes_per_slot,
                "decode_tokens_per_s": options.batch * options.new_tokens / decode,
                "max_logit_diff_vs_bfloat16": float((logits[name] - logits["bfloat16"]).abs().max()),
            }
        )
        runtime.close()
    runtimes.clear()
    release(device)
    base = rows[0]
    for row in rows:
        row["bytes_vs_bfloat16"] = row["bytes_per_expert"] / base["bytes_per_expert"]
        row["tokens_per_s_vs_bfloat16"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return {
        "compute_dtype": "bfloat16",
        "prompt_tokens": options.prompt_tokens,
        "new_tokens": options.new_tokens,
        "batch": options.batch,
        "repeats": options.repeats,
        "rows": rows,
    }


# Running ------------------------------------------------------------------------------------------


def run(
    out_json: Path | None,
    work: Path,
    shape: SyntheticShape | None = None,
    options: StoreBenchOptions | None = None,
) -> dict:
    """Every section of ``options``; the JSON is rewritten after each, so a cut-short run keeps its results."""
    shape, options = shape or SyntheticShape(), options or StoreBenchOptions()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    store = prepare_store(work, shape)
    result = {"machine": machine_info(), "device": options.device, "shape": dataclasses.asdict(shape)}
    sections = {
        "load": lambda: load_throughput(store, options.repeats, options.device),
        "switch": lambda: switch_times(store, repeats=options.repeats, device=options.device),
        "memory": lambda: memory(store, work / "checkpoint"),
        "decode": lambda: decode_speed(store, options),
        "dtypes": lambda: dtype_speed(work / "checkpoint", store, options),
    }
    for name in options.sections:
        logger.info("bench store: %s on %s", name, options.device)
        result[name] = sections[name]()
        release(torch.device(options.device))
        write_json(out_json, result)
    print(render(result))
    return result


def render(result: dict) -> str:
    parts = [f"# Expert store on {result.get('device', 'cpu')}"]
    if "load" in result:
        load = result["load"]
        rows = [
            [
                f"plain copy: {load.get('plain_copy', 'tensor copy')} (physical limit)",
                load["plain_copy_gbps"],
                1.0,
            ],
            ["taer activate (slots, LRU, steady state)", load["load_gbps"], load["ratio"]],
            [
                "taer first load incl. xxh3 checksums",
                load["first_load_with_checksums_gbps"],
                load["first_load_with_checksums_gbps"] / load["plain_copy_gbps"],
            ],
        ]
        if "pageable_copy_gbps" in load:
            rows.append(
                [
                    "pageable memory map -> device copy",
                    load["pageable_copy_gbps"],
                    load["pageable_copy_gbps"] / load["plain_copy_gbps"],
                ]
            )
        parts += [
            "\n## Expert load throughput (same bytes, page cache warm)",
            markdown_table(["path", "GB/s", "ratio vs plain copy"], rows),
        ]
    if "switch" in result:
        parts += [
            "\n## Pattern switch time vs fraction of experts changed (half the experts resident)",
            markdown_table(
                ["fraction changed", "experts loaded", "seconds", "relative to a full switch"],
                [
                    [r["fraction_changed"], r["experts_loaded"], r["seconds"], r["relative_to_full_switch"]]
                    for r in result["switch"]
                ],
            ),
        ]
    if "memory" in result:
        parts += [
            "\n## Process memory (fresh process each; RSS added by loading and one forward pass)",
            markdown_table(
                [
                    "config",
                    "slots/layer",
                    "RSS added MB",
                    "of which anonymous MB",
                    "peak RSS MB",
                    "saved vs transformers MB",
                ],
                [
                    [
                        r["config"],
                        r["slots_per_layer"],
                        r["rss_added_mb"],
                        r["rss_anon_added_mb"],
                        r["peak_rss_mb"],
                        r["saved_vs_transformers_mb"],
                    ]
                    for r in result["memory"]
                ],
            ),
        ]
    if "decode" in result:
        decode = result["decode"]
        parts += [
            f"\n## Greedy decoding (batch {decode['batch']}, {decode['prompt_tokens']} prompt tokens, "
            f"{decode['new_tokens']} new tokens)",
            markdown_table(
                ["config", "slots/layer", "expert MB resident", "prefill s", "decode tokens/s"],
                [
                    [
                        r["config"],
                        r["slots_per_layer"],
                        r["expert_bytes_resident"] / 1e6,
                        r["prefill_seconds"],
                        r["decode_tokens_per_s"],
                    ]
                    for r in decode["rows"]
                ],
            ),
            f"\npruned vs full: {decode['pruned_vs_full_tokens_per_s']:.3g}x the tokens/s with "
            f"{decode['pruned_vs_full_expert_bytes']:.0%} of the expert memory",
        ]
    if "dtypes" in result:
        dtypes = result["dtypes"]
        parts += [
            f"\n## Expert dtypes (every expert resident, {dtypes['compute_dtype']} compute, batch "
            f"{dtypes['batch']}, {dtypes['new_tokens']} new tokens, arms interleaved, best of {dtypes['repeats']})",
            markdown_table(
                [
                    "experts stored as",
                    "slots hold",
                    "bytes/expert",
                    "vs bfloat16",
                    "decode tokens/s",
                    "vs bfloat16",
                    "max logit diff",
                ],
                [
                    [
                        r["expert_dtype"],
                        r["slots_hold"],
                        r["bytes_per_expert"],
                        r["bytes_vs_bfloat16"],
                        r["decode_tokens_per_s"],
                        r["tokens_per_s_vs_bfloat16"],
                        r["max_logit_diff_vs_bfloat16"],
                    ]
                    for r in dtypes["rows"]
                ],
            ),
        ]
    return "\n".join(parts)


def add_arguments(parser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--work", type=Path, default=Path(".taer/bench-store"), help="synthetic checkpoint and store"
    )
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated, of {','.join(SECTIONS)} (default: all; on CUDA all but memory)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)


def main(args) -> int:
    shape = SyntheticShape(
        hidden=args.hidden,
        intermediate=args.intermediate,
        num_experts=args.experts,
        num_layers=args.layers,
        top_k=min(8, args.experts // 2),
    )
    cuda = torch.device(args.device).type == "cuda"
    sections = tuple(args.sections.split(",")) if args.sections else (CUDA_SECTIONS if cuda else SECTIONS)
    options = StoreBenchOptions(
        device=args.device,
        sections=sections,
        repeats=args.repeats,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        batch=args.batch,
    )
    work = args.work / f"h{shape.hidden}-i{shape.intermediate}-e{shape.num_experts}-l{shape.num_layers}"
    run(args.json, work, shape, options)
    return 0
