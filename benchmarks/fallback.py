"""`taer bench fallback`: what each ``--fallback`` costs.

The same requests (a labelled split of the tasks file, plus questions unlike any task) are served by
an engine with each fallback in turn: ``general`` (the general pattern), ``exact`` (the model's own
routing) and ``full``. For each: how many requests the vote did not trust (the fallback's share of
the out-of-domain questions and of the in-domain prompts), the accuracy of the in-domain prompts
that fell back, the accuracy over the whole split, and the expert bytes copied into the slots over
the run (the same traffic, so the differences are the fallbacks' cost). Counts and bytes, not
times: they do not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.common import machine_info, write_json
from benchmarks.demo_inputs import add_common_arguments, resolve_inputs, set_threads
from benchmarks.retrieval import OUT_OF_DOMAIN
from demo.suite import load_suite
from expert_store.modes import FALLBACKS
from server.engine import TaerEngine
from server.engine_api import GenerationRequest, SamplingParams
from server.loading import ServeConfig, load_engine_parts
from server.metrics import Metrics

logger = logging.getLogger(__name__)

OUT_OF_DOMAIN_TASK = "(out of domain)"


@dataclass(frozen=True, slots=True)
class Query:
    task: str  # the true task, or OUT_OF_DOMAIN_TASK
    chat: list[dict[str, str]]
    text: str  # what retrieval embeds
    answer: str | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "fallback")
    parser.add_argument("--keep", type=float, default=0.5, help="share of experts each pattern keeps")
    parser.add_argument("--split", default="heldout", help="labelled split of the tasks file (eval, heldout)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--limit", type=int, help="at most this many prompts per task")


def main(args: argparse.Namespace) -> int:
    set_threads(args)
    store, patterns, tasks_file = resolve_inputs(args)
    queries = _queries(tasks_file, args.split, args.limit)
    config = ServeConfig(store, patterns, keep=args.keep, device=args.device)
    rows = {}
    for fallback in tqdm(FALLBACKS, desc="fallbacks", unit="engine"):
        served = asyncio.run(_serve(dataclasses.replace(config, fallback=fallback), queries, args))
        rows[fallback] = _summary(queries, *served)
    report = {
        "machine": machine_info(),
        "store": str(store),
        "split": args.split,
        "keep": args.keep,
        "queries": {
            "in_domain": sum(q.task != OUT_OF_DOMAIN_TASK for q in queries),
            "out_of_domain": len(OUT_OF_DOMAIN),
        },
        "rows": rows,
    }
    print(render_fallback_markdown(report))
    write_json(args.json or args.out / "fallback.json", report)
    return 0


def _queries(tasks_file: Path, split: str, limit: int | None) -> list[Query]:
    suite = load_suite(tasks_file)
    queries = [
        Query(name, example.chat(), example.query, example.answer)
        for name in suite.names
        for example in suite.tasks[name].split(split)[:limit]
    ]
    return queries + [
        Query(OUT_OF_DOMAIN_TASK, [{"role": "user", "content": q}], q, None) for q in OUT_OF_DOMAIN
    ]


async def _serve(config: ServeConfig, queries: list[Query], args) -> tuple[list, list[str], int]:
    """Every query through one engine (concurrently, as clients would): routes, answers, bytes loaded."""
    engine = TaerEngine(lambda: load_engine_parts(config), max_batch_size=16)
    await engine.start(Metrics().engine)
    await asyncio.to_thread(engine.wait_ready, 600)
    tokenizer = engine.tokenizer
    start_bytes = engine.describe()["cache"]["bytes_loaded"]

    async def one(index: int, query: Query):
        prompt = tokenizer.apply_chat_template(query.chat, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        request = GenerationRequest(
            f"fallback-{index}", ids, query.text, SamplingParams(max_tokens=args.max_tokens, temperature=0)
        )
        outputs = [output async for output in engine.generate(request)]
        return outputs[0].routing, "".join(output.text for output in outputs).strip()

    try:
        served = await asyncio.gather(*(one(i, q) for i, q in enumerate(queries)))
        loaded = engine.describe()["cache"]["bytes_loaded"] - start_bytes
    finally:
        await engine.shutdown()
    return [routing for routing, _ in served], [answer for _, answer in served], loaded


def _summary(queries: list[Query], routes: list, answers: list[str], loaded: int) -> dict:
    fell = [i for i, route in enumerate(routes) if route.mode != "pruned" or route.task in ("general", None)]
    in_domain = [i for i, q in enumerate(queries) if q.task != OUT_OF_DOMAIN_TASK]
    fell_in_domain = [i for i in fell if queries[i].task != OUT_OF_DOMAIN_TASK]
    return {
        "out_of_domain_to_fallback": sum(queries[i].task == OUT_OF_DOMAIN_TASK for i in fell),
        "in_domain_to_fallback": len(fell_in_domain),
        "fallback_accuracy": _accuracy(queries, answers, fell_in_domain),
        "accuracy": _accuracy(queries, answers, in_domain),
        "modes": sorted({routes[i].mode for i in fell}),
        "bytes_loaded": loaded,
    }


def _accuracy(queries: list[Query], answers: list[str], rows: list[int]) -> float | None:
    if not rows:
        return None
    return sum(answers[i] == queries[i].answer for i in rows) / len(rows)


def render_fallback_markdown(report: dict) -> str:
    counts = report["queries"]
    lines = [
        f"## Fallbacks (keep {report['keep']:.0%}, {counts['in_domain']} {report['split']} prompts and "
        f"{counts['out_of_domain']} out-of-domain questions)",
        "",
        "| fallback | out-of-domain to it | in-domain to it | their accuracy | split accuracy | MB loaded |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["rows"].items():
        fallback_accuracy = "-" if row["fallback_accuracy"] is None else f"{row['fallback_accuracy']:.1%}"
        lines.append(
            f"| {name} | {row['out_of_domain_to_fallback']}/{counts['out_of_domain']} | "
            f"{row['in_domain_to_fallback']} | {fallback_accuracy} | {row['accuracy']:.1%} | "
            f"{row['bytes_loaded'] / 1e6:.1f} |"
        )
    return "\n".join(lines) + "\n"
