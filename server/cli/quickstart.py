"""`taer quickstart` (what `make run` calls): build the demo model (cached), shard it, calibrate and
index it, then serve it. Each step is skipped when its output is already there and up to date."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

EXAMPLES = """
taer is serving the demo model on http://{host}:{port}

  curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "demo", "messages": [{{"role": "user", "content": "Reverse the word garden"}}], "max_tokens": 16}}'

  curl http://{host}:{port}/generate -H 'Content-Type: application/json' \\
    -d '{{"inputs": "Sort the digits 5 1 4", "parameters": {{"max_new_tokens": 16}}}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='http://{host}:{port}/v1', api_key='none'); \\
print(c.chat.completions.create(model='demo', messages=[{{'role': 'user', 'content': 'Add 12 and 30'}}]).choices[0].message.content)"

  curl http://{host}:{port}/v1/taer/patterns      # tasks, resident experts, cache statistics
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("quickstart", help="build, shard, calibrate and serve the demo model")
    parser.add_argument(
        "--data", type=Path, default=Path(".taer"), help="where the demo, store and patterns go"
    )
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of experts per layer kept")
    parser.add_argument("--mode", choices=["pruned", "exact", "full"], default="pruned")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-serve", action="store_true", help="prepare everything, do not serve")
    parser.set_defaults(func=run)


def prepare(data: Path) -> tuple[Path, Path]:
    """(store, patterns) for the demo model under ``data``, rebuilding only what is stale."""
    from demo.build import build_demo
    from expert_store.errors import PatternError, StoreError
    from expert_store.manifest import MANIFEST_FILE
    from expert_store.shard import shard_checkpoint
    from retrieval.build import build_index_for_tasks
    from retrieval.calibrate import calibrate, load_patterns_for_store

    demo = build_demo(data / "demo")
    store, patterns = data / "store", data / "patterns"
    manifest = store / MANIFEST_FILE
    if not manifest.exists() or manifest.stat().st_mtime < (demo.path / "build.json").stat().st_mtime:
        logger.info("sharding %s -> %s", demo.model_dir, store)
        shard_checkpoint(demo.model_dir, store, force=True)
    try:
        load_patterns_for_store(patterns, store)
        has_index = (patterns / "index").exists()
    except (PatternError, StoreError):
        has_index = False
    if not has_index:
        logger.info("calibrating %s with %s", store, demo.tasks_file)
        calibrate(store, demo.tasks_file, patterns)
        build_index_for_tasks(demo.tasks_file, patterns)
    return store, patterns


def run(args: argparse.Namespace) -> int:
    store, patterns = prepare(args.data)
    if args.no_serve:
        print(f"store: {store}\npatterns: {patterns}")
        return 0
    from server.cli.serve import run as serve

    print(EXAMPLES.format(host=args.host, port=args.port))
    serve_args = argparse.Namespace(
        store_dir=store,
        patterns=patterns,
        keep=args.keep,
        experts_per_layer=None,
        expert_memory=None,
        slots_per_layer=None,
        mode=args.mode,
        host=args.host,
        port=args.port,
        api_key=None,
        max_queue=256,
        max_batch_size=16,
        device="cpu",
        dtype=None,
        encoder=None,
        served_model_name="demo",
    )
    return serve(serve_args)
