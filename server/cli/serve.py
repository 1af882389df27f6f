"""`taer serve STORE_DIR --patterns DIR`: the HTTP server. Every flag can come from a TAER_* variable.

SIGHUP (or ``POST /v1/taer/reload``) makes a running server load its patterns directory again.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from expert_store.errors import TaerError
from expert_store.modes import FALLBACKS, MODES


def _env(name: str, default=None, kind=str):
    value = os.environ.get(f"TAER_{name}")
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except ValueError:
        raise TaerError(
            f"environment variable TAER_{name}={value!r} is not a valid {kind.__name__}"
        ) from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve a store over HTTP (OpenAI and TGI APIs)")
    parser.add_argument(
        "store_dir", type=Path, nargs="?", default=_env("STORE", None, Path), help="the store (TAER_STORE)"
    )
    parser.add_argument(
        "--patterns",
        type=Path,
        default=_env("PATTERNS", None, Path),
        help="patterns directory from `taer calibrate` (TAER_PATTERNS)",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--keep",
        type=float,
        default=_env("KEEP", None, float),
        help="fraction of experts per layer a pattern keeps (TAER_KEEP; default 0.5)",
    )
    budget.add_argument(
        "--experts-per-layer",
        type=int,
        default=_env("EXPERTS_PER_LAYER", None, int),
        help="experts per layer a pattern keeps (TAER_EXPERTS_PER_LAYER)",
    )
    parser.add_argument(
        "--expert-memory",
        type=_bytes,
        default=_env("EXPERT_MEMORY", None, _bytes),
        help="device memory for expert slots, e.g. 20GB (TAER_EXPERT_MEMORY)",
    )
    parser.add_argument(
        "--slots-per-layer",
        type=int,
        default=_env("SLOTS_PER_LAYER", None, int),
        help="expert slots per layer (default: the budget's experts per layer)",
    )
    parser.add_argument("--mode", choices=MODES, default=_env("MODE", "pruned"))
    parser.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default=_env("FALLBACK", "general"),
        help="in pruned mode, what serves a query like nothing stored: the general pattern, exact "
        "mode (every expert, loaded as routed) or the full model (TAER_FALLBACK)",
    )
    parser.add_argument(
        "--router-check",
        choices=("on", "off"),
        default=_env("ROUTER_CHECK", "on"),
        help="in pruned mode, after each prefill compare the retrieved pattern with the prompt's own "
        "routing and re-route a request another task's pattern covers clearly better, before its "
        "first token (needs patterns from this version's `taer calibrate`) (TAER_ROUTER_CHECK)",
    )
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=_env("PORT", 8000, int))
    parser.add_argument("--api-key", default=_env("API_KEY"), help="require this Bearer key (TAER_API_KEY)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=_env("MAX_QUEUE", 256, int),
        help="generation requests in flight (waiting or running) before new ones get 429 (TAER_MAX_QUEUE)",
    )
    parser.add_argument("--max-batch-size", type=int, default=_env("MAX_BATCH_SIZE", 16, int))
    parser.add_argument(
        "--scheduler",
        choices=["fifo", "switch-aware"],
        default=_env("SCHEDULER", "fifo"),
        help="batching policy: fifo (the oldest request leads) or switch-aware (a task keeps the "
        "slots for a bounded quantum) (TAER_SCHEDULER)",
    )
    parser.add_argument("--device", default=_env("DEVICE", "cpu"))
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=_env("DTYPE"))
    parser.add_argument(
        "--encoder",
        type=Path,
        default=_env("ENCODER", None, Path),
        metavar="NAME_OR_DIR",
        help="the encoder the index was built with: minilm (default), mpnet, or a sentence-transformers "
        "model directory (TAER_ENCODER)",
    )
    parser.add_argument(
        "--encoder-dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default=_env("ENCODER_DTYPE", "auto"),
        help="the encoder's weights: auto is bfloat16 on CPUs with native bfloat16, else float32",
    )
    parser.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME"))
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=_env("SHUTDOWN_GRACE", 30.0, float),
        help="seconds the requests in flight may run after SIGTERM before they are ended "
        "(TAER_SHUTDOWN_GRACE); a second signal exits at once",
    )
    record = parser.add_argument_group("recording what is served (for `taer calibrate --refine`)")
    record.add_argument(
        "--record",
        type=Path,
        default=_env("RECORD", None, Path),
        metavar="DIR",
        help="append each request's routing (task, mode, similarity, and its prompt's own expert choices "
        "and TCESS contributions per layer) to rotating JSONL files in DIR, from a background thread "
        "that never holds a request up (TAER_RECORD)",
    )
    record.add_argument(
        "--record-text",
        action="store_true",
        default=_env("RECORD_TEXT", "") not in ("", "0", "false", "no"),
        help="also store the prompt and the retrieval text (default: their SHA-256 only); needed for "
        "`taer calibrate --refine` to propose new tasks (TAER_RECORD_TEXT)",
    )
    record.add_argument(
        "--record-max-bytes",
        type=_bytes,
        default=_env("RECORD_MAX_BYTES", 64 * 2**20, _bytes),
        help="a record file is closed and a new one started before it would pass this size, e.g. "
        "64MiB (TAER_RECORD_MAX_BYTES; default 64 MiB)",
    )
    record.add_argument(
        "--record-max-files",
        type=int,
        default=_env("RECORD_MAX_FILES", 8, int),
        help="record files kept; the oldest are deleted past it (TAER_RECORD_MAX_FILES; default 8)",
    )
    cluster = parser.add_argument_group("replicas on Ray Serve")
    cluster.add_argument(
        "--replicas",
        type=int,
        default=_env("REPLICAS", None, int),
        help="serve with N model replicas on Ray Serve, each with its own expert slots (TAER_REPLICAS); "
        "without it taer serves in this process and never imports Ray",
    )
    cluster.add_argument(
        "--ray-address",
        default=_env("RAY_ADDRESS"),
        help="join this running Ray cluster (TAER_RAY_ADDRESS); default: start a local Ray instance",
    )
    cluster.add_argument(
        "--replica-cpus",
        type=float,
        default=_env("REPLICA_CPUS", 1.0, float),
        help="CPUs each replica reserves, and its torch threads on a CPU device (TAER_REPLICA_CPUS)",
    )
    cluster.add_argument(
        "--replica-max-ongoing",
        type=int,
        default=_env("REPLICA_MAX_ONGOING", None, int),
        help="requests one replica holds before its task spills over to another "
        "(TAER_REPLICA_MAX_ONGOING; default --max-batch-size)",
    )
    cluster.add_argument(
        "--replica-routing",
        choices=["task-affinity", "ray-default"],
        default=_env("REPLICA_ROUTING", "task-affinity"),
        help="task-affinity: a request goes to a replica holding its pattern (Ray Serve multiplexing); "
        "ray-default: Ray Serve's own choice by queue length (TAER_REPLICA_ROUTING)",
    )
    parser.set_defaults(func=run)


def _bytes(text: str) -> int:
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    lowered = text.strip().lower()
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(float(lowered))


def run(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.engine import TaerEngine
    from server.loading import ServeConfig, check_serve_config, load_engine_parts, reload_router
    from server.record_files import RecordOptions
    from server.settings import ServerSettings
    from server.shutdown import serve

    if args.store_dir is None or args.patterns is None:
        raise TaerError("give the store directory and --patterns (or TAER_STORE and TAER_PATTERNS)")
    config = ServeConfig(
        store_dir=args.store_dir,
        patterns_dir=args.patterns,
        keep=args.keep,
        experts_per_layer=args.experts_per_layer,
        expert_memory=args.expert_memory,
        slots_per_layer=args.slots_per_layer,
        mode=args.mode,
        fallback=args.fallback,
        router_check=args.router_check == "on",
        device=args.device,
        dtype=args.dtype,
        encoder=args.encoder,
        encoder_dtype=args.encoder_dtype,
    )
    check_serve_config(config)
    record = None
    if args.record is not None:
        record = RecordOptions(
            args.record,
            max_bytes=args.record_max_bytes,
            max_files=args.record_max_files,
            with_text=args.record_text,
        )
    engine = TaerEngine(
        lambda: load_engine_parts(config),
        max_batch_size=args.max_batch_size,
        scheduler=args.scheduler,
        reload=lambda current: reload_router(config, current),
        record=record,
    )
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_queue=args.max_queue,
        model_name=args.served_model_name,
    )
    if args.replicas is not None:
        if record is not None:
            raise TaerError("--record needs the single process: replicas on Ray Serve do not record")
        return _run_cluster(args, config, settings)
    return serve(create_app(engine, settings), args.host, args.port, args.shutdown_grace)


def _run_cluster(args: argparse.Namespace, config, settings) -> int:
    from server.cluster.app import ClusterConfig, run_cluster
    from server.cluster.replica import ReplicaOptions
    from server.loading import tasks_per_replica

    if args.replicas < 1:
        raise TaerError(f"--replicas must be at least 1, got {args.replicas}")
    on_gpu = config.device.startswith("cuda")
    replicas = ReplicaOptions(
        num_replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        scheduler=args.scheduler,
        max_ongoing_requests=args.replica_max_ongoing or args.max_batch_size,
        tasks_per_replica=tasks_per_replica(config, args.replicas),
        num_cpus=args.replica_cpus,
        num_gpus=1.0 if on_gpu else 0.0,
        torch_threads=None if on_gpu else max(1, int(args.replica_cpus)),
    )
    cluster = ClusterConfig(config, settings, replicas, task_affinity=args.replica_routing == "task-affinity")
    return run_cluster(cluster, args.ray_address)
