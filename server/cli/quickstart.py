"""`taer quickstart` (what `make run` calls): prepare the demo (:func:`demo.prepare.prepare_demo`:
build, shard, calibrate and index it, each step skipped when up to date), then serve it."""

from __future__ import annotations

import argparse
from pathlib import Path

from expert_store.modes import MODES

EXAMPLES = """
taer is serving the demo model on http://{host}:{port}
(open http://{host}:{port}/ in a browser: task patterns, slots, requests and a prompt box)

  curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "demo", "messages": [{{"role": "user", "content": "Reverse garden."}}], "max_tokens": 16}}'

  # TGI's /generate takes the prompt as the model sees it: here the demo's chat format
  curl http://{host}:{port}/generate -H 'Content-Type: application/json' \\
    -d '{{"inputs": "<|user|>\\nSort the digits of 5142.\\n<|assistant|>\\n", "parameters": {{"max_new_tokens": 16}}}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='http://{host}:{port}/v1', api_key='none'); \\
print(c.chat.completions.create(model='demo', messages=[{{'role': 'user', 'content': 'Add 12 and 3.'}}]).choices[0].message.content)"

  curl http://{host}:{port}/v1/taer/patterns      # tasks, resident experts, cache statistics
  curl http://{host}:{port}/v1/taer/route -H 'Content-Type: application/json' -d '{{"prompt": "Reverse garden."}}'
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("quickstart", help="build, shard, calibrate and serve the demo model")
    parser.add_argument(
        "--data", type=Path, default=Path(".taer"), help="where the demo, store and patterns go"
    )
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of experts per layer kept")
    parser.add_argument("--mode", choices=MODES, default="pruned")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-serve", action="store_true", help="prepare everything, do not serve")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from demo.prepare import DemoPaths, prepare_demo

    prepared = prepare_demo(DemoPaths.under(args.data))
    store, patterns = prepared.store, prepared.patterns
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
