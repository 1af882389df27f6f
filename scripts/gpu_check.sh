#!/usr/bin/env bash
# The GPU check of taer, in one run of under 8 minutes on one CUDA device:
#   1. an environment: a venv that sees a preinstalled torch (never replaced), taer installed from
#      this tree with its dev extras;
#   2. the GPU tests (tests/gpu), then the CPU expert-store tests;
#   3. `taer bench store --device cuda` on a synthetic checkpoint with Qwen3-30B-A3B's expert shapes
#      (hidden 2048, expert intermediate 768, 128 experts, top-8; 4 layers, 4.8 GB of bf16 experts):
#      host-to-device expert load GB/s vs a plain pinned copy of the same bytes, pattern switches,
#      and decode tokens/s pruned to half the experts vs all experts resident.
# Every step runs even when an earlier one failed; the exit status is non-zero if any failed.
#
# Usage: scripts/gpu_check.sh OUT_DIR
#   OUT_DIR gets log.txt (everything printed), store.json (the benchmark), gpu-tests.xml and
#   cpu-tests.xml (JUnit) and summary.json (each step's status and seconds).
#
# Environment (all optional):
#   GPU_CHECK_DEVICE       cuda (default) or cpu: a dry run of the whole script with tiny shapes
#   GPU_CHECK_PYTHON       an interpreter that already has taer and its dependencies: no venv, no pip
#   GPU_CHECK_VENV         where the venv goes (default: $TMPDIR/taer-gpu-check-venv)
#   GPU_CHECK_WORK         synthetic checkpoint and store (default: $TMPDIR/taer-gpu-check-work)
#   GPU_CHECK_STEPS        which steps, in order (default: "gpu-tests cpu-tests bench")
#   GPU_CHECK_PYTEST_ARGS  extra arguments for the GPU tests' pytest
#   TORCH_PIN              installed only when the venv has no torch at all (default: torch==2.13.0)
#   TAER_GPU_TESTS_DEVICE  cpu: the GPU tests run their own logic on the CPU instead of skipping
set -euo pipefail

if [[ $# -ne 1 || $1 == -* ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEPS=${GPU_CHECK_STEPS:-gpu-tests cpu-tests bench}
SCRATCH=${TMPDIR:-/tmp}
WORK=${GPU_CHECK_WORK:-$SCRATCH/taer-gpu-check-work}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # this tree, installed or not

case $DEVICE in
    cuda*) BENCH_SHAPE=(--experts 128 --hidden 2048 --intermediate 768 --layers 4
                        --prompt-tokens 32 --new-tokens 64 --repeats 3) ;;
    cpu) BENCH_SHAPE=(--experts 8 --hidden 64 --intermediate 32 --layers 2
                      --prompt-tokens 4 --new-tokens 4 --repeats 1)
         export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;;  # tiny shapes: threads only contend
    *) echo "GPU_CHECK_DEVICE must be cuda[:N] or cpu, got $DEVICE" >&2; exit 2 ;;
esac

# Seconds. With about 40 s to set up, the whole check stays under 8 minutes even when every step
# runs to its limit; a usual run on an H200 takes far less.
declare -A LIMIT=([gpu-tests]=170 [cpu-tests]=80 [bench]=180)

for step in $STEPS; do
    [[ -n ${LIMIT[$step]:-} ]] || { echo "unknown step $step; steps: ${!LIMIT[*]}" >&2; exit 2; }
done

log() { printf '\n==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

make_venv() {
    local base=$1 venv=${GPU_CHECK_VENV:-$SCRATCH/taer-gpu-check-venv} site
    log "venv $venv over $base's packages (a preinstalled CUDA torch is used, never replaced)"
    "$base" -m venv --system-site-packages "$venv"
    PY=$venv/bin/python
    if ! "$PY" -c 'import torch' 2>/dev/null && "$base" -c 'import torch' 2>/dev/null; then
        # The base is itself a venv or a conda env, whose packages --system-site-packages misses.
        site=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
        "$base" -c 'import site; print(f"import site; list(map(site.addsitedir, {site.getsitepackages()!r}))")' \
            >"$site/taer_gpu_check_base.pth"
    fi
    if ! "$PY" -c 'import torch' 2>/dev/null; then
        log "no torch found: installing ${TORCH_PIN:-torch==2.13.0}"
        "$PY" -m pip install -q "${TORCH_PIN:-torch==2.13.0}"
    fi
    # Pin the torch found, so that resolving taer's dependencies can never replace it.
    "$PY" -c 'import torch; print(f"torch=={torch.__version__}")' >"$venv/constraints.txt"
    local isolation=()
    # pyproject's SPDX license string needs setuptools 77: with it, build offline, without isolation.
    if "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
        isolation=(--no-build-isolation)
    fi
    log "pip install -e '.[dev]'"
    if ! "$PY" -m pip install -q -c "$venv/constraints.txt" "${isolation[@]}" -e "${ROOT}[dev]"; then
        # Offline, with the dependencies there but an old setuptools: run from the tree.
        log "pip could not install taer; running it from the tree if what it imports is there"
        "$PY" -c "$DEPS_IMPORT"
    fi
}

# What the GPU check imports: with all of it present, no installation is needed.
DEPS_IMPORT='import numpy, pytest, safetensors, tokenizers, torch, tqdm, transformers, xxhash, yaml'

setup_python() {
    local base=${PYTHON:-python3}
    if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then
        PY=$GPU_CHECK_PYTHON
        log "using $PY as it is (GPU_CHECK_PYTHON)"
    elif "$base" -c "$DEPS_IMPORT" 2>/dev/null; then
        PY=$(command -v "$base")
        log "$PY already has torch and everything the check imports: using it with this tree, no install"
    else
        make_venv "$base"
    fi
    "$PY" - "$DEVICE" <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"devices {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
if sys.argv[1].startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device: nothing to check (GPU_CHECK_DEVICE=cpu for a dry run)")
    print("device:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
}

# Each step sets CMD, the command that main runs under the step's time limit.
step_gpu_tests() {
    local extra=()
    read -r -a extra <<<"${GPU_CHECK_PYTEST_ARGS:-}"
    CMD=("$PY" -m pytest tests/gpu -q -p no:cacheprovider -o addopts=-ra --junitxml "$OUT/gpu-tests.xml"
         "${extra[@]}")
}

step_cpu_tests() {
    CMD=("$PY" -m pytest tests/expert_store -q -p no:cacheprovider -o addopts=-ra --junitxml "$OUT/cpu-tests.xml")
}

step_bench() {
    local args=(--device "$DEVICE" --sections "load,switch,decode" --json "$OUT/store.json" --work "$WORK"
                "${BENCH_SHAPE[@]}")
    if [[ -x $(dirname "$PY")/taer ]]; then
        CMD=("$(dirname "$PY")/taer" bench store "${args[@]}")
    else  # taer not installed: the same benchmark through its own parser
        CMD=("$PY" -c 'import argparse, logging, sys
from benchmarks import store
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
parser = argparse.ArgumentParser(prog="taer bench store")
store.add_arguments(parser)
sys.exit(store.main(parser.parse_args()))' "${args[@]}")
    fi
}

main() {
    cd "$ROOT"
    log "taer GPU check: device $DEVICE, steps: $STEPS, out $OUT"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    fi
    setup_python
    local results=() failed=0 step status start
    for step in $STEPS; do
        log "$step (limit ${LIMIT[$step]} s)"
        start=$SECONDS
        status=0
        "step_${step//-/_}"
        timeout "${LIMIT[$step]}" "${CMD[@]}" || status=$?
        [[ $status -eq 0 ]] || failed=1
        log "$step: $([[ $status -eq 0 ]] && echo ok || echo "FAILED (status $status)") in $((SECONDS - start)) s"
        results+=("{\"step\": \"$step\", \"status\": $status, \"seconds\": $((SECONDS - start))}")
    done
    local IFS=,
    echo "{\"device\": \"$DEVICE\", \"ok\": $([[ $failed -eq 0 ]] && echo true || echo false), \"steps\": [${results[*]}]}" \
        >"$OUT/summary.json"
    log "summary: $(cat "$OUT/summary.json")"
    return "$failed"
}

main 2>&1 | tee "$OUT/log.txt"
