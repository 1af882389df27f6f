"""`taer discover LOG --out tasks.yaml`: find the tasks in a request log and write a tasks file.

LOG is JSONL of OpenAI chat/completions request bodies, or one prompt per line. The tasks file goes
to `taer calibrate` unchanged; see :mod:`retrieval.discover_tasks` for what is written where.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.discover import DEFAULT_OPTIONS, DiscoveryOptions
from server.cli.arguments import ENCODERS, add_encoder_argument


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "discover", help="cluster a request log's prompts into tasks and write a tasks file for calibrate"
    )
    parser.add_argument("log", type=Path, help="JSONL of OpenAI request bodies, or one prompt per line")
    parser.add_argument("--out", type=Path, required=True, help="the tasks file (.yaml) to write")
    parser.add_argument(
        "--clusters", type=int, default=None, help="the number of tasks (default: chosen by the data)"
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=DEFAULT_OPTIONS.min_size,
        help="the fewest prompts a discovered task may have; sets how finely the data is split (32)",
    )
    parser.add_argument(
        "--min-similarity",
        type=float,
        default=DEFAULT_OPTIONS.min_similarity,
        help="a prompt with fewer than 4 others at this cosine fits no task and goes to general "
        "(default: the retrieval vote's threshold)",
    )
    parser.add_argument("--held-out", type=float, default=0.2, help="share of each task held out (0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the held-out split and any sampling")
    add_encoder_argument(parser, f"{ENCODERS}: use the index's encoder")
    parser.add_argument("--examples", type=int, default=3, help="central prompts shown per task")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrieval.discover_tasks import discover_tasks

    options = DiscoveryOptions(
        num_clusters=args.clusters,
        min_size=args.min_size,
        min_similarity=args.min_similarity,
        seed=args.seed,
    )
    result = discover_tasks(args.log, args.out, options, args.held_out, encoder_path=args.encoder)
    print(render_summary(result, args.examples))
    return 0


def render_summary(result, examples: int = 3) -> str:
    """The table of tasks (sizes, separation, central prompts) and where everything went."""
    discovery, texts = result.discovery, result.log.texts
    rows = ["| task | prompts | calibration | held out | silhouette | margin | most central prompts |"]
    rows.append("|---|---:|---:|---:|---:|---:|---|")
    for task in result.tasks:
        shown = " / ".join(_short(texts[i]) for i in task.cluster.members[:examples])
        rows.append(
            f"| {task.name} | {task.cluster.size} | {len(task.calibration)} | {len(task.heldout)} | "
            f"{_number(task.cluster.silhouette)} | {_number(task.cluster.margin)} | {shown} |"
        )
    how = (
        f"fixed by --clusters {len(result.tasks)}"
        if discovery.chosen_by == "fixed"
        else "the most clusters with every cluster at least --min-size prompts"
    )
    by_k = ", ".join(f"{k}: {v:.3f}" for k, v in discovery.silhouette_by_k.items())
    lines = [
        "\n".join(rows),
        "",
        f"{len(result.log.prompts)} distinct prompts ({result.log.num_repeats} repeats dropped), "
        f"{len(result.tasks)} tasks ({how}); silhouette {_number(discovery.silhouette)}"
        + (f" (by number of clusters: {by_k})" if by_k else ""),
        f"{len(result.general)} prompts fit no task -> {result.prompts_dir / 'general.jsonl'}",
        f"wrote {result.tasks_file} and {result.prompts_dir}/; next: "
        f"taer calibrate STORE_DIR {result.tasks_file} --out PATTERNS_DIR",
    ]
    return "\n".join(lines)


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
