"""The Docker deployment, checked without a Docker engine.

The compose file and the Dockerfile are parsed and held to their rules; the health probe runs
against a real HTTP server; the entry point runs for real, in dry-run mode (it prints its plan) and
with a stand-in ``taer`` on PATH (it runs the plan), under the environment each scenario sets.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
DOCKERIGNORE = ROOT / ".dockerignore"

BUDGET_VARS = ("TAER_KEEP", "TAER_EXPERTS_PER_LAYER", "TAER_EXPERT_MEMORY")
_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}`` and ``${VAR:-default}`` substitution, as the host shell would feed it."""
    return _COMPOSE_VAR.sub(lambda match: env.get(match[1]) or match[2] or "", value)


# Compose -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]["taer"]


def compose_env(service: dict, host_env: Mapping[str, str]) -> dict[str, str]:
    return {key: interpolate(str(value), host_env) for key, value in service["environment"].items()}


def compose_mounts(service: dict, host_env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of every short-syntax volume."""
    mounts = {}
    for entry in service["volumes"]:
        source, target, *mode = interpolate(entry, host_env).split(":")
        mounts[target] = (source, mode[0] if mode else "rw")
    return mounts


def test_compose_builds_from_the_repo_root(service):
    assert service["build"]["context"] == "."
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_compose_reserves_an_nvidia_gpu(service):
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert device.get("count") in (1, "all") or device.get("device_ids")


def test_compose_mounts_model_read_only_and_data_writable(service):
    mounts = compose_mounts(service, {})
    assert mounts["/model"] == ("./models/model", "ro")
    assert mounts["/tasks"][1] == "ro"
    assert mounts["/data"][1] == "rw"
    moved = compose_mounts(service, {"TAER_MODEL_DIR": "/srv/qwen", "TAER_DATA_DIR": "/nvme/taer"})
    assert moved["/model"] == ("/srv/qwen", "ro")
    assert moved["/data"][0] == "/nvme/taer"


def test_compose_paths_point_into_the_mounts(service):
    env, mounts = compose_env(service, {}), compose_mounts(service, {})
    assert env["TAER_MODEL"] in mounts and mounts[env["TAER_MODEL"]][1] == "ro"
    assert str(Path(env["TAER_TASKS"]).parent) in mounts
    for name in ("TAER_STORE", "TAER_PATTERNS"):
        # taer shard renames the finished store into place: it must sit inside a writable mount, on
        # the same file system as its parent, and never be a mount point itself.
        path = Path(env[name])
        assert env[name] not in mounts, f"{name} is a mount point"
        assert mounts[str(path.parent)][1] == "rw", f"{name} is not inside a writable mount"
    assert compose_env(service, {"TAER_TASKS_FILE": "mine.yaml"})["TAER_TASKS"] == "/tasks/mine.yaml"


def test_compose_publishes_on_loopback_unless_told(service):
    (port,) = service["ports"]
    assert interpolate(port, {}) == "127.0.0.1:8000:8000"
    wide = {"TAER_PUBLISH_ADDR": "0.0.0.0", "TAER_PORT": "9000"}
    assert interpolate(port, wide) == "0.0.0.0:9000:9000"
    # The server, the published port and the health probe must agree on the container port.
    assert compose_env(service, wide)["TAER_PORT"] == interpolate(port, wide).split(":")[-1]


def test_compose_configures_through_taer_variables(service):
    env = compose_env(service, {})
    wanted = {
        "TAER_TASKS",
        *BUDGET_VARS,
        "TAER_MODE",
        "TAER_PORT",
        "TAER_API_KEY",
        "TAER_DEVICE",
        "TAER_DTYPE",
    }
    assert wanted <= set(env)
    # Defaults must never set two budgets at once (the entry point refuses that).
    assert sum(bool(env[name]) for name in BUDGET_VARS) <= 1
    assert env["TAER_API_KEY"] == ""
    assert compose_env(service, {"TAER_API_KEY": "k3y", "TAER_KEEP": "0.3"})["TAER_API_KEY"] == "k3y"
    # TAER_HOST comes from the image: a host shell's TAER_HOST=127.0.0.1 must not leak in.
    assert "TAER_HOST" not in env


def test_compose_healthcheck_restart_and_shared_memory(service):
    probe = service["healthcheck"]["test"]
    assert probe[0] in ("CMD", "CMD-SHELL")
    assert "/usr/local/bin/taer-healthcheck" in " ".join(probe)
    assert ("docker/healthcheck.py", "/usr/local/bin/taer-healthcheck") in copies()
    assert service["healthcheck"]["start_period"]
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert service.get("shm_size") or service.get("ipc") == "host"


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file(tmp_path):
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose plugin or docker-compose on this machine")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TAER_PUBLISH_ADDR": "0.0.0.0"}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]["taer"]
    assert resolved["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert str(resolved["ports"][0]).startswith("0.0.0.0:8000:8000")


# Dockerfile --------------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    parsed = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            parsed.append((keyword.upper(), rest.strip()))
    return parsed


def arguments(keyword: str) -> list[str]:
    return [rest for name, rest in instructions() if name == keyword]


def copies() -> list[tuple[str, str]]:
    """(source, destination) of every COPY/ADD, flags dropped."""
    pairs = []
    for name, rest in instructions():
        if name in ("COPY", "ADD"):
            words = [word for word in shlex.split(rest) if not word.startswith("--")]
            pairs += [(source, words[-1]) for source in words[:-1]]
    return pairs


def image_env() -> dict[str, str]:
    env = {}
    for rest in arguments("ENV"):
        env.update(word.split("=", 1) for word in shlex.split(rest))
    return env


def base_image() -> str:
    """The FROM image with ARG defaults filled in."""
    defaults = dict(rest.split("=", 1) for rest in arguments("ARG") if "=" in rest)
    (image,) = arguments("FROM")
    return _DOCKER_VAR.sub(lambda match: defaults[match[1]], image.split()[0])


_DOCKER_VAR = re.compile(r"\$\{?(\w+)\}?")
_PYTORCH_TAG = re.compile(r"^pytorch/pytorch:(\d+\.\d+\.\d+)-cuda\d+\.\d+-cudnn\d+-runtime$")


def test_base_image_is_a_pinned_cuda_pytorch():
    image = base_image()
    match = _PYTORCH_TAG.match(image)
    assert match, f"{image} is not a pinned pytorch/pytorch CUDA runtime tag"


def test_base_torch_satisfies_the_project_so_pip_keeps_it():
    tomllib = pytest.importorskip("tomllib")
    torch_version = Version(_PYTORCH_TAG.match(base_image())[1])
    dependencies = [
        Requirement(r)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    (torch,) = [r for r in dependencies if r.name == "torch"]
    assert torch.specifier.contains(torch_version), (
        f"pyproject's {torch} would make pip replace torch {torch_version}"
    )
    if any(r.name == "transformers" and r.specifier.contains("5.0") for r in dependencies):
        assert torch_version >= Version("2.6"), "transformers 5 disables torch below 2.6"
    # ...and the install pins the base's torch, so no dependency can swap it for another build.
    installs = [rest for rest in arguments("RUN") if "pip install" in rest]
    assert installs and all("--constraint" in rest for rest in installs)
    assert any("'torch=='" in rest and "constraints.txt" in rest for rest in arguments("RUN"))


def test_image_runs_as_a_non_root_user():
    users = arguments("USER")
    assert users, "no USER: the server would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    names = [name for name, _ in instructions()]
    assert names.index("USER") < names.index("ENTRYPOINT")


def test_image_serves_on_all_interfaces_with_a_healthcheck():
    assert image_env()["TAER_HOST"] == "0.0.0.0"
    assert arguments("EXPOSE") == ["8000"]
    (healthcheck,) = arguments("HEALTHCHECK")
    assert "/usr/local/bin/taer-healthcheck" in healthcheck and "--start-period" in healthcheck
    assert "/health" in HEALTHCHECK.read_text()
    (entrypoint,) = arguments("ENTRYPOINT")
    assert ("docker/entrypoint.sh", "/usr/local/bin/taer-entrypoint") in copies()
    assert "taer-entrypoint" in entrypoint


def test_image_and_compose_agree_on_container_paths(service):
    env = compose_env(service, {})
    for name in ("TAER_MODEL", "TAER_TASKS", "TAER_STORE", "TAER_PATTERNS", "TAER_PORT"):
        assert image_env()[name] == env[name], name


def test_no_model_is_baked_into_the_image():
    for source, _ in copies():
        assert not re.search(r"models?/|\.safetensors|\.bin$|\.taer|^https?://", source), source
    assert not [source for source, _ in copies() if source == "." and not DOCKERIGNORE.exists()]


# .dockerignore -----------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = path.split("/")
    ignored = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        regex = _pattern_regex(pattern)
        if any(regex.match("/".join(parts[:depth])) for depth in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git/HEAD",
        ".taer/docker/store/manifest.json",
        "models/model/model-00001-of-00016.safetensors",
        "models/model/tokenizer.json",
        "bench-results/fidelity.json",
        "server/__pycache__/app.cpython-311.pyc",
        "scratch/weights.safetensors",
        ".env",
        ".pytest_cache/v/cache/lastfailed",
    ],
)
def test_dockerignore_keeps_heavy_and_secret_files_out(path):
    assert dockerignored(path)


def test_dockerignore_keeps_what_the_build_needs():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["pyproject.toml", project["project"]["readme"], *(f"{p}/__init__.py" for p in packages)]
    needed += [source for source, _ in copies() if source != "."]
    for path in needed:
        assert not dockerignored(path), f"{path} is needed by the build but .dockerignore drops it"
        assert (ROOT / path).exists() or path.endswith("__init__.py"), path


# Health probe ------------------------------------------------------------------------------------


@dataclass
class FakeServer:
    port: int
    status: int = 200
    seen: list[tuple[str, str | None]] | None = None


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    state = FakeServer(port=0, seen=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state.seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(state.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def probe(port: int, **env: str) -> int:
    full_env = {"PATH": os.environ["PATH"], "TAER_HOST": "0.0.0.0", "TAER_PORT": str(port), **env}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=full_env, capture_output=True, timeout=30
    ).returncode


def test_probe_is_healthy_only_on_200(fake_server):
    assert probe(fake_server.port) == 0
    fake_server.status = 503
    assert probe(fake_server.port) == 1
    assert fake_server.seen == [("/health", None), ("/health", None)]


def test_probe_sends_the_api_key_and_ignores_proxies(fake_server):
    assert (
        probe(
            fake_server.port,
            TAER_API_KEY="k3y",
            HTTP_PROXY="http://127.0.0.1:9",
            http_proxy="http://127.0.0.1:9",
        )
        == 0
    )
    assert fake_server.seen == [("/health", "Bearer k3y")]


def test_probe_fails_when_nothing_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert probe(port) == 1


# Entry point -------------------------------------------------------------------------------------


@dataclass
class Box:
    """A container's file system laid out under tmp_path, and the environment the image gives it."""

    root: Path
    model: Path
    tasks: Path
    store: Path
    patterns: Path
    demo: Path
    env: dict[str, str]

    def run(self, *args: str, dry_run: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        argv = ["bash", str(ENTRYPOINT), *(["--dry-run"] if dry_run else []), *args]
        return subprocess.run(argv, env={**self.env, **env}, capture_output=True, text=True, timeout=60)

    def finish_store(self) -> None:
        self.store.mkdir(parents=True)
        (self.store / "manifest.json").write_text("{}")
        shutil.copy(self.model / "config.json", self.store / "config.json")

    def finish_patterns(self) -> None:
        self.patterns.mkdir(parents=True)
        (self.patterns / "patterns.json").write_text("{}")


@pytest.fixture
def box(tmp_path) -> Box:
    model, tasks, data = tmp_path / "model", tmp_path / "tasks", tmp_path / "data"
    for path in (model, tasks, data):
        path.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (tasks / "tasks.yaml").write_text("tasks: {math: {calibration: math.jsonl}}\n")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "TAER_HOST": "0.0.0.0",
        "TAER_PORT": "8000",
        "TAER_MODEL": str(model),
        "TAER_TASKS": str(tasks / "tasks.yaml"),
        "TAER_STORE": str(data / "store"),
        "TAER_PATTERNS": str(data / "patterns"),
        "TAER_DEMO_DIR": str(data / "demo"),
        "TAER_GPU_CHECK_CMD": "true",
    }
    return Box(tmp_path, model, tasks / "tasks.yaml", data / "store", data / "patterns", data / "demo", env)


def plan(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def serve(
    box: Box, *flags: str, device: str = "cuda", budget: tuple[str, ...] = ("--keep", "0.5")
) -> list[str]:
    head = ["taer", "serve", str(box.store), "--patterns", str(box.patterns), *budget]
    return [*head, "--mode", "pruned", "--host", "0.0.0.0", "--port", "8000", "--device", device, *flags]


def test_first_boot_shards_calibrates_then_serves(box):
    result = box.run()
    assert result.returncode == 0, result.stderr
    assert plan(result) == [
        ["taer", "shard", str(box.model), str(box.store)],
        ["taer", "calibrate", str(box.store), str(box.tasks), "--out", str(box.patterns)],
        serve(box),
    ]
    assert not box.store.exists(), "a dry run must not write anything"


def test_later_boot_reuses_store_and_patterns(box):
    box.finish_store()
    box.finish_patterns()
    result = box.run(TAER_TASKS=str(box.root / "gone.yaml"))  # tasks are not needed any more
    assert result.returncode == 0, result.stderr
    assert plan(result) == [serve(box)]


def test_missing_patterns_are_calibrated_on_the_existing_store(box):
    box.finish_store()
    result = box.run()
    assert result.returncode == 0, result.stderr
    assert plan(result) == [
        ["taer", "calibrate", str(box.store), str(box.tasks), "--out", str(box.patterns)],
        serve(box),
    ]


def test_interrupted_shard_is_cleaned_and_replaced(box):
    box.store.mkdir()
    (box.store / "dense.safetensors").write_bytes(b"half")
    stale = box.store.parent / ".store.partial-1a2b3c4d"
    stale.mkdir()
    result = box.run()
    assert result.returncode == 0, result.stderr
    assert plan(result)[:2] == [
        ["rm", "-rf", "--", str(stale)],
        ["taer", "shard", str(box.model), str(box.store), "--force"],
    ]


def prepare_demo(box: Box) -> list[str]:
    return [
        "taer",
        "demo",
        "prepare",
        "--demo",
        str(box.demo),
        "--store",
        str(box.store),
        "--patterns",
        str(box.patterns),
    ]


@pytest.mark.parametrize("mount", ["missing", "empty"])
def test_no_model_prepares_and_serves_the_demo(box, mount):
    shutil.rmtree(box.model)
    if mount == "empty":  # what docker leaves when the host directory did not exist
        box.model.mkdir()
    result = box.run()
    assert result.returncode == 0, result.stderr
    # One command (demo.prepare.prepare_demo, as `taer quickstart` runs it) builds, shards,
    # calibrates and indexes, each step only when stale.
    assert plan(result) == [prepare_demo(box), serve(box)]
    assert "demo" in result.stderr


def test_the_demo_index_uses_the_chosen_encoder(box):
    shutil.rmtree(box.model)
    (first, _) = plan(box.run(TAER_ENCODER="/encoders/mine"))
    assert first == [*prepare_demo(box), "--encoder", "/encoders/mine"]


def test_a_prepared_demo_is_only_served(box):
    shutil.rmtree(box.model)
    box.store.mkdir(parents=True)
    (box.store / "manifest.json").write_text("{}")
    box.finish_patterns()
    assert plan(box.run()) == [serve(box)]


def test_an_interrupted_demo_shard_is_cleaned_before_preparing(box):
    shutil.rmtree(box.model)
    box.store.mkdir(parents=True)
    stale = box.store.parent / ".store.partial-1a2b3c4d"
    stale.mkdir()
    assert plan(box.run())[:2] == [["rm", "-rf", "--", str(stale)], prepare_demo(box)]


def test_a_model_dir_without_config_is_refused(box):
    (box.model / "config.json").unlink()
    (box.model / "weights.bin").write_bytes(b"x")
    result = box.run()
    assert result.returncode == 2
    assert "config.json" in result.stderr and plan(result) == []


def test_no_gpu_stops_with_a_clear_message(box):
    result = box.run(TAER_GPU_CHECK_CMD="exit 1")
    assert result.returncode != 0
    assert "no CUDA GPU" in result.stderr and "TAER_DEVICE=cpu" in result.stderr
    assert plan(result) == []


def test_no_gpu_with_cpu_device_falls_back_to_the_cpu(box):
    marker = box.root / "gpu-checked"
    result = box.run(TAER_DEVICE="cpu", TAER_GPU_CHECK_CMD=f"touch {marker}; exit 1")
    assert result.returncode == 0, result.stderr
    assert plan(result)[-1] == serve(box, device="cpu")
    assert not marker.exists(), "TAER_DEVICE=cpu must not need a GPU check"


def test_the_gpu_check_command_decides(box):
    marker = box.root / "gpu-checked"
    result = box.run(TAER_GPU_CHECK_CMD=f"touch {marker}")
    assert result.returncode == 0 and marker.exists()


@pytest.mark.parametrize("tasks", ["missing-file", "unset"])
def test_a_model_without_tasks_file_is_refused_before_any_work(box, tasks):
    env = box.env.copy()
    if tasks == "unset":
        del env["TAER_TASKS"]
    else:
        env["TAER_TASKS"] = str(box.root / "nowhere" / "tasks.yaml")
    result = subprocess.run(
        ["bash", str(ENTRYPOINT), "--dry-run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "tasks file" in result.stderr and "TAER_TASKS" in result.stderr
    assert plan(result) == []


def test_a_tasks_directory_is_accepted(box):
    result = box.run(TAER_TASKS=str(box.tasks.parent))
    assert plan(result)[1] == [
        "taer",
        "calibrate",
        str(box.store),
        str(box.tasks),
        "--out",
        str(box.patterns),
    ]


@pytest.mark.parametrize(
    ("env", "budget"),
    [
        ({"TAER_KEEP": "0.25"}, ("--keep", "0.25")),
        ({"TAER_EXPERTS_PER_LAYER": "64"}, ("--experts-per-layer", "64")),
        ({"TAER_EXPERT_MEMORY": "18572378112"}, ("--expert-memory", "18572378112")),
        ({"TAER_KEEP": "", "TAER_EXPERTS_PER_LAYER": "8"}, ("--experts-per-layer", "8")),  # compose's empties
    ],
)
def test_budget_comes_from_one_variable(box, env, budget):
    box.finish_store()
    box.finish_patterns()
    result = box.run(**env)
    assert result.returncode == 0, result.stderr
    assert plan(result) == [serve(box, budget=budget)]


def test_two_budgets_are_refused(box):
    result = box.run(TAER_KEEP="0.5", TAER_EXPERT_MEMORY="1000")
    assert result.returncode == 2
    assert "TAER_KEEP" in result.stderr and "TAER_EXPERT_MEMORY" in result.stderr


def test_serve_flags_follow_the_environment_and_extra_arguments(box):
    box.finish_store()
    box.finish_patterns()
    env = {"TAER_MODE": "exact", "TAER_PORT": "9000", "TAER_DTYPE": "float16", "TAER_MAX_QUEUE": "4"}
    result = box.run("--verbose-flag", TAER_API_KEY="s3cret", TAER_ENCODER_DTYPE="float32", **env)
    assert result.returncode == 0, result.stderr
    (command,) = plan(result)
    assert command[command.index("--mode") + 1] == "exact"
    assert command[command.index("--port") + 1] == "9000"
    expected = ["--dtype", "float16", "--max-queue", "4", "--encoder-dtype", "float32", "--verbose-flag"]
    assert command[-7:] == expected
    assert "s3cret" not in result.stdout + result.stderr


def test_a_store_from_another_checkpoint_is_refused(box):
    box.finish_store()
    box.finish_patterns()
    (box.model / "config.json").write_text('{"model_type": "mixtral"}')
    result = box.run()
    assert result.returncode == 2
    assert "another checkpoint" in result.stderr


def test_taer_dry_run_variable_equals_the_flag(box):
    assert plan(box.run(dry_run=False, TAER_DRY_RUN="1")) == plan(box.run())


def test_a_command_runs_instead_of_the_server(box):
    result = box.run("echo", "hello", dry_run=False, TAER_GPU_CHECK_CMD="exit 1")
    assert result.returncode == 0 and result.stdout == "hello\n"


FAKE_TAER = """#!/usr/bin/env bash
# Stand-in for the taer CLI: records each call and what it saw, and does the minimum a real run does.
{ printf '%s\\n' "$*"; env | grep '^TAER_' | sort | sed 's/^/  env /'; } >> "$TAER_FAKE_LOG"
case $1 in
  shard) mkdir -p "$3" && cp "$2/config.json" "$3/" && echo '{}' > "$3/manifest.json" ;;
  calibrate) mkdir -p "$5" && echo '{}' > "$5/patterns.json" ;;
esac
"""


def test_a_real_boot_runs_the_plan_and_execs_the_server(box):
    bin_dir = box.root / "bin"
    bin_dir.mkdir()
    (bin_dir / "taer").write_text(FAKE_TAER)
    (bin_dir / "taer").chmod(0o755)
    log = box.root / "taer.log"
    env = {"PATH": f"{bin_dir}:{box.env['PATH']}", "TAER_FAKE_LOG": str(log), "TAER_API_KEY": "s3cret"}
    result = box.run(dry_run=False, TAER_DTYPE="", **env)
    assert result.returncode == 0, result.stderr
    calls = [line for line in log.read_text().splitlines() if not line.startswith("  env ")]
    assert [call.split()[0] for call in calls] == ["shard", "calibrate", "serve"]
    serve_env = log.read_text().split("\nserve ")[1]
    assert "  env TAER_API_KEY=s3cret" in serve_env and "s3cret" not in calls[-1]
    assert "TAER_DTYPE=" not in serve_env, "empty variables must not reach the CLI"

    log.unlink()
    second = box.run(dry_run=False, **env)  # the next boot finds both and only serves
    assert second.returncode == 0, second.stderr
    assert [line.split()[0] for line in log.read_text().splitlines() if not line.startswith("  env ")] == [
        "serve"
    ]
