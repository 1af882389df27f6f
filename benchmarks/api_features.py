"""`taer bench api`: what structured outputs and ``n`` samples cost, against a real `taer serve`.

1. Constrained decoding (``benchmarks.api_constrained``). The same prompts go to
   ``/v1/chat/completions`` twice, streamed, at the same temperature and ``max_tokens`` and without
   ``ignore_eos``: once with ``response_format`` json_schema (an object of one integer) and once
   free, the arms alternating request by request for several rounds. Decode time per token is
   timed on the client from the streamed tokens; the result is the median ratio of back-to-back
   pairs over the same positions (each answer's first tokens, as many as the shorter answer has:
   the constrained answers are longer, and the first steps after a prefill are not the fastest),
   with the share of constrained outputs that parse and validate. Beside it, the grammar's own work
   per token: llguidance's mask and its application (``server.structured.Matcher``, in a hot loop
   in this process) on the served tokenizer.
2. ``n`` samples (``benchmarks.api_samples``). One request with ``n=4`` against four concurrent
   ``n=1`` requests of the same prompt and seeds, ``ignore_eos`` so every sample generates
   ``max_tokens``, the arms alternating per round: the ratios of generated tokens per second, of
   wall time and of the time until every sample has its first token, and the prompt tokens each arm
   prefilled (the ``n`` samples share one prefill).

Runs on the demo model (built by `taer demo prepare`), a store given, or (``--tiny``) the test
suite's tiny random model for a smoke run. Writes ``OUT/api_features.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from benchmarks.api_constrained import (
    MAX_RATIO,
    SCHEMA,
    ConstrainedSettings,
    measure_constrained,
    time_grammar_mask,
)
from benchmarks.api_samples import SamplesSettings, measure_samples
from benchmarks.common import machine_info, write_json
from benchmarks.serving import BenchInputs

logger = logging.getLogger(__name__)

KEEP = 0.5  # the served expert share, as `make run` serves the demo


@dataclass(frozen=True, slots=True)
class ApiSettings:
    per_task: int = 1  # prompts per task (its first calibration queries)
    constrained: ConstrainedSettings = field(default_factory=ConstrainedSettings)
    samples: SamplesSettings = field(default_factory=SamplesSettings)
    request_timeout_s: float = 300.0


QUICK = ApiSettings(
    constrained=ConstrainedSettings(rounds=2, max_tokens=16, mask_repeats=20),
    samples=SamplesSettings(rounds=2, max_tokens=8),
)


async def measure(base_url: str, prompts: list[str], settings: ApiSettings) -> dict:
    """Both parts against a started server."""
    clients = settings.samples.samples
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    # trust_env=False: a proxy from the environment must never see loopback benchmark traffic.
    async with httpx.AsyncClient(
        base_url=base_url, timeout=settings.request_timeout_s, limits=limits, trust_env=False
    ) as client:
        constrained = await measure_constrained(client, prompts, settings.constrained)
        samples = await measure_samples(client, prompts, settings.samples)
    return {"constrained": constrained, "samples": samples}


def run_api(inputs: BenchInputs, settings: ApiSettings, log_dir: Path, slots_per_layer: int | None) -> dict:
    """Start `taer serve` on ``inputs``, measure both parts, then time the grammar in this process."""
    from benchmarks.servers import ServerProcess, free_port, taer_spec
    from benchmarks.soak import task_prompts

    prompts = task_prompts(inputs.tasks, settings.per_task)
    spec = taer_spec(inputs.store, inputs.patterns, KEEP, free_port(), name="api")
    if slots_per_layer:
        spec = replace(spec, command=[*spec.command, "--slots-per-layer", str(slots_per_layer)])
    with ServerProcess(spec, log_dir / "taer.log") as server:
        result = asyncio.run(measure(server.spec.base_url, prompts, settings))
    result["mask"] = time_grammar_mask(inputs.store, settings.constrained.mask_repeats)
    result["targets"] = api_targets(result)
    result["settings"] = asdict(settings) | {"prompts": len(prompts), "keep": KEEP, "schema": SCHEMA}
    result["inputs"] = {
        "store": str(inputs.store),
        "patterns": str(inputs.patterns),
        "tasks": str(inputs.tasks),
    }
    return result


def api_targets(result: dict) -> list[dict]:
    ratio = result["constrained"]["ratio"]["median"]
    return [
        {
            "target": f"json_schema / free decode time per token, same positions <= {MAX_RATIO}x",
            "measured": ratio,
            "bound": MAX_RATIO,
            "met": None if ratio is None else ratio <= MAX_RATIO,
        }
    ]


def resolve(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[BenchInputs, int | None]:
    """(inputs, slots per layer): the tiny test pipeline, the store given, or the demo if it is built."""
    from benchmarks.serving import resolve_inputs
    from demo.build import read_stamp
    from demo.prepare import DemoPaths
    from expert_store.errors import TaerError

    if args.tiny:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="taer-bench-api-")))
        return tiny_inputs(root), args.slots_per_layer or 8  # 8 slots, as the serving tests run it
    if args.store is not None and (args.patterns is None or args.tasks is None):
        raise TaerError("--store needs --patterns and --tasks as well")
    if args.store is None and read_stamp(DemoPaths.under(args.data).demo) is None:
        raise TaerError(
            f"no demo model under {args.data}: build it with `taer demo prepare --data {args.data}` "
            "(15-20 min on 2 CPU cores; `make run` builds it under .taer), or give --store, --patterns and "
            "--tasks, or --tiny for a smoke run on the test suite's tiny model"
        )
    return resolve_inputs(args.data, args.store, args.patterns, None, args.tasks), args.slots_per_layer


def tiny_inputs(root: Path) -> BenchInputs:
    """The test suite's tiny pipeline (``tests/pipeline.py``: random weights, a character tokenizer)
    built under ``root`` in seconds: a smoke run of the benchmark, not a measurement of a real model."""
    import sys

    from expert_store.errors import TaerError

    tests = Path(__file__).resolve().parents[1] / "tests"
    if not (tests / "pipeline.py").is_file():
        raise TaerError("--tiny builds the model of tests/pipeline.py: run it from a source checkout of taer")
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))  # pipeline.py imports its helpers (tiny_models) by name
    from pipeline import build_pipeline

    store, patterns = build_pipeline(root)
    return BenchInputs(store, patterns, root / "ckpt", root / "tasks" / "tasks.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="writes api_features.json here"
    )
    parser.add_argument("--data", type=Path, default=Path(".taer"), help="demo model, store and patterns")
    parser.add_argument(
        "--store", type=Path, help="another store instead of the demo (with --patterns, --tasks)"
    )
    parser.add_argument("--patterns", type=Path, help="patterns directory of --store")
    parser.add_argument("--tasks", type=Path, help="tasks.yaml whose calibration queries are the prompts")
    parser.add_argument(
        "--tiny", action="store_true", help="the test suite's tiny random model (a smoke run)"
    )
    parser.add_argument("--quick", action="store_true", help="two rounds of each part, few tokens")
    parser.add_argument("--per-task", type=int, help="prompts per task")
    parser.add_argument("--rounds", type=int, help="part 1: rounds of every prompt in both arms")
    parser.add_argument("--max-tokens", type=int, help="part 1: max_tokens of both arms")
    parser.add_argument("--temperature", type=float, help="part 1: temperature of both arms (default greedy)")
    parser.add_argument("--samples", type=int, help="part 2: n, and the number of separate requests")
    parser.add_argument("--samples-rounds", type=int, help="part 2: rounds")
    parser.add_argument("--samples-max-tokens", type=int, help="part 2: tokens each sample generates")
    parser.add_argument("--slots-per-layer", type=int, help="passed to the started taer serve")


def settings_from(args: argparse.Namespace) -> ApiSettings:
    """QUICK or the defaults, with every size given on the command line."""
    base = QUICK if args.quick else ApiSettings()

    def given(**names: str) -> dict:
        return {field_: getattr(args, arg) for field_, arg in names.items() if getattr(args, arg) is not None}

    constrained = given(rounds="rounds", max_tokens="max_tokens", temperature="temperature")
    samples = given(samples="samples", rounds="samples_rounds", max_tokens="samples_max_tokens")
    return replace(
        base,
        per_task=args.per_task or base.per_task,
        constrained=replace(base.constrained, **constrained),
        samples=replace(base.samples, **samples),
    )


def main(args: argparse.Namespace) -> int:
    from benchmarks.api_features_render import render

    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = settings_from(args)
    with contextlib.ExitStack() as stack:
        inputs, slots_per_layer = resolve(args, stack)
        result = run_api(inputs, settings, args.out / "api-logs", slots_per_layer)
    result["machine"] = machine_info()
    write_json(args.out / "api_features.json", result)
    print("## API features: structured outputs and n samples\n\n" + render(result))
    return 0
