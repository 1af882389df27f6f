"""The ingress deployment, the application builder and the ``taer serve --replicas`` launcher.

``build_app`` is what both ``taer serve --replicas N`` and a Ray Serve config file (``serve deploy``,
through :func:`app_builder`) deploy: an ingress serving the single process's FastAPI app over a
:class:`~server.cluster.remote_engine.RemoteEngine`, bound to the model deployment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ray
from ray import serve

from server.app import create_app
from server.cluster.remote_engine import RemoteEngine, ReplicaMetricsCollector
from server.cluster.replica import ReplicaOptions, model_deployment
from server.cluster.state import NAMESPACE, cluster_state, state_actor_name
from server.loading import ServeConfig, load_routing_parts, tasks_per_replica
from server.metrics import Metrics
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

INGRESS_DEPLOYMENT = "TaerIngress"
TEARDOWN_S = 45.0  # the most a stop waits for Ray to take the application down


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Everything a taer application on Ray Serve is built from."""

    serve: ServeConfig
    settings: ServerSettings
    replicas: ReplicaOptions = field(default_factory=ReplicaOptions)
    app_name: str = "taer"
    ingress_replicas: int = 1
    ingress_cpus: float = 0.5
    task_affinity: bool = True


@serve.ingress()
class TaerIngress:
    """Validates, tokenises, embeds and retrieves (the single process's HTTP app), then generates on
    a model replica."""

    def __init__(
        self, model, config: ServeConfig, settings: ServerSettings, app_name: str, task_affinity: bool
    ) -> None:
        self._engine = RemoteEngine(
            model, partial(load_routing_parts, config), partial(cluster_state, app_name), task_affinity
        )
        self._engine.load_now()
        self._settings = settings

    def __serve_build_asgi_app__(self):
        metrics = Metrics(with_engine=False)
        metrics.registry.register(ReplicaMetricsCollector(lambda: self._engine.reports))
        return create_app(self._engine, self._settings, metrics)


def build_app(cluster: ClusterConfig):
    """The Ray Serve application: the ingress bound to ``cluster.replicas.num_replicas`` model replicas."""
    model = model_deployment(cluster.replicas).bind(cluster.serve, cluster.app_name)
    ingress = serve.deployment(
        TaerIngress,
        name=INGRESS_DEPLOYMENT,
        num_replicas=cluster.ingress_replicas,
        # The app's own admission (max_queue) answers 429; Ray Serve must not refuse before it.
        max_ongoing_requests=cluster.settings.max_queue + 16,
        ray_actor_options={"num_cpus": cluster.ingress_cpus},
    )
    return ingress.bind(model, cluster.serve, cluster.settings, cluster.app_name, cluster.task_affinity)


def app_builder(args: dict[str, Any]):
    """For a Ray Serve config file (``import_path: server.cluster.app:app_builder``): ``args`` holds
    ``store``, ``patterns`` and optionally ``keep``, ``experts_per_layer``, ``expert_memory``,
    ``mode``, ``fallback``, ``router_check`` (bool), ``device``, ``dtype``, ``api_key``, ``max_queue``, ``served_model_name``,
    ``replicas``, ``max_batch_size``, ``scheduler``, ``max_ongoing_requests``."""
    config = ServeConfig(
        store_dir=Path(args["store"]),
        patterns_dir=Path(args["patterns"]),
        keep=args.get("keep"),
        experts_per_layer=args.get("experts_per_layer"),
        expert_memory=args.get("expert_memory"),
        mode=args.get("mode", "pruned"),
        fallback=args.get("fallback", "general"),
        router_check=bool(args.get("router_check", True)),
        device=args.get("device", "cuda"),
        dtype=args.get("dtype"),
    )
    settings = ServerSettings(
        api_key=args.get("api_key"),
        max_queue=int(args.get("max_queue", 256)),
        model_name=args.get("served_model_name"),
    )
    batch = int(args.get("max_batch_size", 16))
    num_replicas = int(args.get("replicas", 1))
    replicas = ReplicaOptions(
        num_replicas=num_replicas,
        max_batch_size=batch,
        scheduler=args.get("scheduler", "fifo"),
        max_ongoing_requests=int(args.get("max_ongoing_requests", batch)),
        tasks_per_replica=tasks_per_replica(config, num_replicas),
        num_cpus=float(args.get("replica_cpus", 1.0)),
        num_gpus=1.0 if config.device.startswith("cuda") else 0.0,
    )
    return build_app(ClusterConfig(config, settings, replicas))


def run_cluster(cluster: ClusterConfig, ray_address: str | None = None) -> int:
    """Deploy on a local Ray instance (started here and stopped on exit) or on the cluster at
    ``ray_address``, serve on ``settings.host:port`` until SIGINT or SIGTERM, then take it down."""
    settings = cluster.settings
    local = ray_address is None
    needed = cluster.replicas.num_replicas * cluster.replicas.num_cpus + cluster.ingress_cpus + 1
    ray.init(
        address=ray_address,
        namespace=NAMESPACE,
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)) if local else None,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    stop = _stop_on_signals()
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(cluster), name=cluster.app_name, route_prefix="/")
        logger.info(
            "taer is serving on http://%s:%d with %d model replicas",
            settings.host,
            settings.port,
            cluster.replicas.num_replicas,
        )
        stop.wait()
    finally:
        taken_down = _take_down(cluster.app_name, local)
        ray.shutdown()
    return 0 if taken_down else 1


def _take_down(app_name: str, local: bool) -> bool:
    """Delete the application (its replicas finish what they serve first), its state actor and, on
    a local instance, Serve itself; within ``TEARDOWN_S``. A bound, because a Ray instance whose
    processes got the stop signal too (a terminal's Ctrl-C reaches the whole process group) no
    longer answers, and Ray's client would wait a minute for it. True when all went down in time."""

    def steps() -> None:
        serve.delete(app_name)
        _remove_state(app_name)
        if local:
            serve.shutdown()

    logger.info("taking the application down")
    worker = threading.Thread(target=steps, name="taer-teardown", daemon=True)
    worker.start()
    worker.join(TEARDOWN_S)
    if worker.is_alive():
        logger.warning("Ray did not take the application down within %.0f s; leaving it", TEARDOWN_S)
        return False
    return True


def _stop_on_signals() -> threading.Event:
    """Set by the first SIGINT or SIGTERM; a second one exits at once."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        if stop.is_set():
            logger.warning("second stop signal: exiting now")
            logging.shutdown()
            os._exit(1)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)
    return stop


def _remove_state(app_name: str) -> None:
    with contextlib.suppress(ValueError):  # never created
        ray.kill(ray.get_actor(state_actor_name(app_name), namespace=NAMESPACE))
