"""Server processes for the serving benchmark: `taer serve` and the peer, on 127.0.0.1 only.

A ``ServerProcess`` starts a command, waits until ``/health`` answers, reads the process's resident
memory from /proc while it runs, and always stops it (terminate, then kill) on exit.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.loadgen import LOOPBACK

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    label: str
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 300.0

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def offline_env(threads: int | None) -> dict[str, str]:
    """No hub, no proxies for loopback, and the same torch threads for every server."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "NO_PROXY": LOOPBACK,
    }
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def taer_spec(
    store: Path,
    patterns: Path,
    keep: float,
    port: int,
    device: str = "cpu",
    threads: int | None = None,
    max_batch_size: int = 16,
    name: str = "taer",
) -> ServerSpec:
    command = [
        sys.executable,
        "-m",
        "server",
        "serve",
        str(store),
        "--patterns",
        str(patterns),
        "--keep",
        str(keep),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--device",
        device,
        "--max-batch-size",
        str(max_batch_size),
    ]
    label = "taer serve (every expert resident)" if keep >= 1 else f"taer serve (pruned, keep {keep:.0%})"
    return ServerSpec(name, label, command, port, offline_env(threads))


def peer_missing() -> str | None:
    """Why `transformers serve` cannot run here, or None when it can."""
    if not peer_cli().exists():
        return f"no `transformers` command next to {sys.executable}"
    missing = [
        name for name in ("accelerate", "fastapi", "uvicorn") if importlib.util.find_spec(name) is None
    ]
    if missing:
        return f"`transformers serve` needs {', '.join(missing)}: pip install -e '.[serving-peer]'"
    return None


def peer_cli() -> Path:
    return Path(sys.executable).with_name("transformers")


def peer_spec(
    checkpoint: Path, port: int, continuous_batching: bool, device: str = "cpu", threads: int | None = None
) -> ServerSpec:
    command = [
        str(peer_cli()),
        "serve",
        str(checkpoint),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--device",
        device,
        "--log-level",
        "warning",
    ]
    if continuous_batching:
        # Its CPU default reserves a large share of host RAM for the paged KV cache; 8,192 tokens hold
        # every request of the benchmark many times over.
        command += ["--continuous-batching", "--cb-num-blocks", "256", "--cb-block-size", "32"]
        name, label = "peer-cb", "transformers serve --continuous-batching"
    else:
        name, label = "peer", "transformers serve (default: sequential generate)"
    return ServerSpec(name, label, command, port, offline_env(threads))


class ServerProcess:
    """``with ServerProcess(spec, log) as server:`` -- started, healthy, and stopped on exit."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.startup_s = 0.0

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        start = time.perf_counter()
        self.process = subprocess.Popen(
            self.spec.command, env={**os.environ, **self.spec.env}, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        try:
            self._wait_healthy(start)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self, start: float) -> None:
        with httpx.Client(trust_env=False, timeout=2) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.spec.name} exited with {self.process.returncode}: {self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.spec.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - start > self.spec.startup_timeout_s:
                    raise RuntimeError(
                        f"{self.spec.name} not healthy after {self.spec.startup_timeout_s:.0f} s"
                    )
                time.sleep(0.25)

    def memory(self) -> dict[str, int]:
        """Current (VmRSS) and peak (VmHWM) resident bytes of the server process, and the current
        ones split into anonymous memory (its own allocations: RssAnon) and file pages mapped in
        (RssFile: the store's memory-mapped shards, as far as they were read; bounded by their size,
        and the kernel's to reclaim)."""
        fields = {}
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:  # the process has gone (or this is not Linux): nothing to read
            status = ""
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
        return {
            "rss_bytes": fields.get("VmRSS", 0),
            "peak_rss_bytes": fields.get("VmHWM", 0),
            "rss_anon_bytes": fields.get("RssAnon", 0),
            "rss_file_bytes": fields.get("RssFile", 0),
        }

    def model_id(self) -> str:
        with httpx.Client(trust_env=False, timeout=10) as client:
            return client.get(f"{self.spec.base_url}/v1/models").json()["data"][0]["id"]

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
