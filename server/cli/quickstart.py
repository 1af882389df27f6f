"""`taer quickstart` (what `make run` calls): build the demo model (cached), shard it, calibrate and
index it, then serve it. Each step is skipped when its output is already there and up to date."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

EXAMPLES = """
taer is serving the demo model on http://{host}:{port}

  curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "demo", "messages": [{{"role": "user", "content": "Reverse garden."}}], "max_tokens": 16}}'

  # TGI's /generate takes the prompt as the model sees it: here the demo's chat format
  curl http://{host}:{port}/generate -H 'Content-Type: application/json' \\
    -d '{{"inputs": "<|user|>\\nSort the digits of 5142.\\n<|assistant|>\\n", "parameters": {{"max_new_tokens": 16}}}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='http://{host}:{port}/v1', api_key='none'); \\
print(c.chat.completions.create(model='demo', messages=[{{'role': 'user', 'content': 'Add 12 and 3.'}}]).choices[0].message.content)"

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
    from retrieval.build import INDEX_SUBDIR, build_index_for_tasks
    from retrieval.calibrate import calibrate, load_patterns_for_store

    demo = build_demo(data / "demo")
    store, patterns = data / "store", data / "patterns"
    manifest = store / MANIFEST_FILE
    if not manifest.exists() or manifest.stat().st_mtime < (demo.path / "build.json").stat().st_mtime:
        logger.info("sharding %s -> %s", demo.model_dir, store)
        shard_checkpoint(demo.model_dir, store, force=True)
    try:
        load_patterns_for_store(patterns, store)
        calibrated = True
    except (PatternError, StoreError):
        calibrated = False
    if not calibrated:
        logger.info("calibrating %s with %s", store, demo.tasks_file)
        calibrate(store, demo.tasks_file, patterns)
    if not calibrated or not _index_is_current(patterns / INDEX_SUBDIR):
        logger.info("indexing %s", demo.tasks_file)
        build_index_for_tasks(demo.tasks_file, patterns)
    return store, patterns


def _index_is_current(directory: Path) -> bool:
    """An index of this taer's format is there (an older one lacks what a rebuild would add)."""
    from retrieval.index_io import FORMAT_VERSION, METADATA_FILE

    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("format_version") == FORMAT_VERSION


def run(args: argparse.Namespace) -> int:
    store, patterns = prepare(args.data)
    if args.no_serve:
        print(f"store: {store}\npatterns: {patterns}")
        return 0
    print(EXAMPLES.format(host=args.host, port=args.port))
    serve_args = serve_arguments(store, patterns, args)
    return serve_args.func(serve_args)


def serve_arguments(store: Path, patterns: Path, args: argparse.Namespace) -> argparse.Namespace:
    """`taer serve`'s own arguments for the demo, parsed by its parser: every option it has gets
    its default (TAER_* variables included), so the two commands cannot drift apart."""
    from server.cli import serve

    parser = argparse.ArgumentParser(prog="taer")
    serve.register(parser.add_subparsers())
    command = [str(store), "--patterns", str(patterns), "--keep", str(args.keep), "--mode", args.mode]
    command += ["--host", args.host, "--port", str(args.port), "--device", "cpu"]
    return parser.parse_args(["serve", *command, "--served-model-name", "demo"])
