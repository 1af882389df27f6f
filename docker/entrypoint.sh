#!/usr/bin/env bash
# The container's entry point: prepare on first boot, then serve.
#
# First boot: when $TAER_STORE has no manifest.json, `taer shard` the checkpoint mounted at
# $TAER_MODEL; when $TAER_PATTERNS has no patterns.json, `taer calibrate` with $TAER_TASKS. When no
# checkpoint is mounted, `taer demo prepare` does both for the built-in demo (the library function
# `taer quickstart` and the benchmarks call: build, shard, calibrate, index, each only when stale).
# Later boots find both and go straight to `exec taer serve`. Everything is planned and checked
# before anything runs, so a missing tasks file or GPU is reported at once, not after an hour of
# sharding.
#
# Usage: entrypoint.sh [--dry-run] [EXTRA `taer serve` FLAGS...]
#        entrypoint.sh COMMAND [ARGS...]     anything not starting with "-" runs instead (bash, taer ...)
# --dry-run (or TAER_DRY_RUN=1) prints the commands, one per line after "+ ", instead of running them;
# the checks (GPU included, through $TAER_GPU_CHECK_CMD) still run.
# Exit status: 2 bad configuration, 3 no GPU, otherwise that of the taer command that failed.
set -euo pipefail

readonly DEFAULT_GPU_CHECK='python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"'

log() { printf 'taer-entrypoint: %s\n' "$*" >&2; }
die() {
    local status=$1
    shift
    printf 'taer-entrypoint: error: %s\n' "$*" >&2
    exit "$status"
}

quote() {
    local words=() word
    for word in "$@"; do words+=("$(printf '%q' "$word")"); done
    printf '%s' "${words[*]}"
}

is_true() { [[ ${1,,} =~ ^(1|true|yes|on)$ ]]; }

# Runs a command, or only prints it in a dry run.
run() {
    if is_true "$dry_run"; then
        printf '+ %s\n' "$(quote "$@")"
    else
        log "running: $(quote "$@")"
        "$@"
    fi
}

is_empty_dir() { [[ -d $1 && -z $(ls -A "$1") ]]; }

# A compose file that leaves a variable unset passes it as "": treat that as not given, so that the
# taer CLI (which reads TAER_* itself) never parses an empty value.
drop_empty_taer_vars() {
    local name
    for name in $(compgen -e); do
        if [[ $name == TAER_* && -z ${!name} ]]; then unset "$name"; fi
    done
}

# Sets model_dir, tasks_file and using_demo: where the checkpoint and tasks come from.
choose_source() {
    local mounted=${TAER_MODEL:-/model}
    if [[ -f $mounted/config.json ]]; then
        model_dir=$mounted
        tasks_file=${TAER_TASKS:-}
        if [[ -d $tasks_file ]]; then tasks_file=$tasks_file/tasks.yaml; fi
        return
    fi
    if [[ -e $mounted ]] && ! is_empty_dir "$mounted"; then
        die 2 "$mounted (TAER_MODEL) holds no config.json: mount a Hugging Face checkpoint directory" \
            "there (compose: TAER_MODEL_DIR), or leave it empty to serve the built-in demo"
    fi
    local demo=${TAER_DEMO_DIR:-/data/demo}
    log "no model mounted at $mounted: serving the built-in demo (built into $demo)"
    if [[ -n ${TAER_TASKS:-} && -e $TAER_TASKS ]]; then
        log "ignoring the tasks file $TAER_TASKS: the demo is calibrated with its own tasks"
    fi
    model_dir=$demo/model
    using_demo=1
}

check_tasks_file() {
    if [[ -z $tasks_file ]]; then
        die 2 "a model is mounted at $model_dir but no tasks file is set: set TAER_TASKS to a" \
            "tasks.yaml (compose: mount its directory with TAER_TASKS_DIR); docker/README.md shows the format"
    fi
    if [[ ! -f $tasks_file ]]; then
        die 2 "a model is mounted at $model_dir but the tasks file $tasks_file (TAER_TASKS) does not" \
            "exist: mount a directory holding tasks.yaml and its JSONL files at /tasks (compose:" \
            "TAER_TASKS_DIR, TAER_TASKS_FILE); docker/README.md shows the format"
    fi
}

# A store is reused as long as it is complete, so a different checkpoint mounted over an old data
# directory would silently serve the old model; the store keeps the checkpoint's config.json verbatim.
check_store_matches_model() {
    local mounted=${TAER_MODEL:-/model}
    [[ -f $mounted/config.json && -f $store_dir/config.json ]] || return 0
    if [[ $(<"$mounted/config.json") != $(<"$store_dir/config.json") ]]; then
        die 2 "the store at $store_dir was sharded from another checkpoint (its config.json differs" \
            "from $mounted/config.json): give this model its own data directory (compose:" \
            "TAER_DATA_DIR), or delete $store_dir and $patterns_dir to shard this one there"
    fi
}

is_mount_point() {
    [[ -d $1 ]] || return 1
    if command -v mountpoint >/dev/null; then mountpoint -q "$1"; else [[ $(stat -c %d "$1") != $(stat -c %d "$1/..") ]]; fi
}

# `taer shard` writes beside the store and renames it into place: the store's parent must be
# writable, on the same file system, and the store itself must not be a mount point.
check_store_writable() {
    local parent
    parent=$(dirname "$store_dir")
    if is_mount_point "$store_dir"; then
        die 2 "$store_dir is a mount point; taer shard replaces the store by renaming, which a mount" \
            "point forbids: mount its parent directory instead (compose: TAER_DATA_DIR)"
    fi
    if [[ ! -d $parent || ! -w $parent ]]; then
        die 2 "$parent is not writable by uid $(id -u): on the host, run" \
            "\`mkdir -p DIR && sudo chown $(id -u):$(id -g) DIR\` for the directory mounted there" \
            "(compose: TAER_DATA_DIR, default ./.taer/docker)"
    fi
}

# A shard killed hard (SIGKILL, power loss) leaves its work directory beside the store, as big as
# the store itself; remove it before sharding again rather than fill the disk.
remove_stale_shard_output() {
    local stale
    for stale in "$(dirname "$store_dir")/.$(basename "$store_dir")".{partial,old}-*; do
        if [[ -e $stale ]]; then run rm -rf -- "$stale"; fi
    done
}

check_gpu() {
    if [[ $device == cpu ]]; then
        log "TAER_DEVICE=cpu: running on the CPU (slow; for trying things out)"
        return
    fi
    local check=${TAER_GPU_CHECK_CMD:-$DEFAULT_GPU_CHECK}
    if ! bash -c "$check"; then
        die 3 "no CUDA GPU is visible in this container (check: $check). On the host, check that" \
            "\`nvidia-smi\` works and that the NVIDIA Container Toolkit is installed" \
            "(\`docker run --rm --gpus all IMAGE nvidia-smi\`), and that the service reserves a GPU" \
            "(docker-compose.yml: deploy.resources.reservations.devices). To run on the CPU" \
            "instead (slow), set TAER_DEVICE=cpu."
    fi
}

# Appends the one budget flag to serve_cmd; two budgets at once are a mistake worth stopping for.
add_budget() {
    local flags=(--keep 0.5) names=()
    if [[ -n ${TAER_KEEP:-} ]]; then flags=(--keep "$TAER_KEEP"); names+=(TAER_KEEP); fi
    if [[ -n ${TAER_EXPERTS_PER_LAYER:-} ]]; then
        flags=(--experts-per-layer "$TAER_EXPERTS_PER_LAYER"); names+=(TAER_EXPERTS_PER_LAYER)
    fi
    if [[ -n ${TAER_EXPERT_MEMORY:-} ]]; then
        flags=(--expert-memory "$TAER_EXPERT_MEMORY"); names+=(TAER_EXPERT_MEMORY)
    fi
    if ((${#names[@]} > 1)); then
        die 2 "set one budget, not several: ${names[*]} are all set; keep one of TAER_KEEP," \
            "TAER_EXPERTS_PER_LAYER and TAER_EXPERT_MEMORY"
    fi
    serve_cmd+=("${flags[@]}")
}

build_serve_cmd() {
    serve_cmd=(taer serve "$store_dir" --patterns "$patterns_dir")
    add_budget
    serve_cmd+=(--mode "${TAER_MODE:-pruned}" --host "${TAER_HOST:-0.0.0.0}" --port "${TAER_PORT:-8000}")
    serve_cmd+=(--device "$device")
    if [[ -n ${TAER_DTYPE:-} ]]; then serve_cmd+=(--dtype "$TAER_DTYPE"); fi
    if [[ -n ${TAER_MAX_QUEUE:-} ]]; then serve_cmd+=(--max-queue "$TAER_MAX_QUEUE"); fi
    if [[ -n ${TAER_ENCODER_DTYPE:-} ]]; then serve_cmd+=(--encoder-dtype "$TAER_ENCODER_DTYPE"); fi
    # The API key stays in the environment (taer serve reads TAER_API_KEY): on the command line
    # `ps` would show it to every process in the container.
    serve_cmd+=("$@")
}

# The demo: one command, the library function `taer quickstart` and the benchmarks call.
prepare_demo() {
    if ((need_shard)); then remove_stale_shard_output; fi
    local prepare_cmd=(taer demo prepare --demo "${TAER_DEMO_DIR:-/data/demo}" --store "$store_dir")
    prepare_cmd+=(--patterns "$patterns_dir")
    if [[ -n ${TAER_ENCODER:-} ]]; then prepare_cmd+=(--encoder "$TAER_ENCODER"); fi
    run "${prepare_cmd[@]}"
}

shard_and_calibrate() {
    if ((need_shard)); then
        remove_stale_shard_output
        local shard_cmd=(taer shard "$model_dir" "$store_dir")
        # A store without manifest.json is the remains of an interrupted shard: replace it.
        if [[ -d $store_dir ]] && ! is_empty_dir "$store_dir"; then shard_cmd+=(--force); fi
        run "${shard_cmd[@]}"
    else
        log "reusing the store at $store_dir"
    fi
    if ((need_calibrate)); then
        local calibrate_cmd=(taer calibrate "$store_dir" "$tasks_file" --out "$patterns_dir")
        if [[ -n ${TAER_ENCODER:-} ]]; then calibrate_cmd+=(--encoder "$TAER_ENCODER"); fi
        run "${calibrate_cmd[@]}"
    else
        log "reusing the patterns at $patterns_dir"
    fi
}

main() {
    if [[ $# -gt 0 && $1 != -* ]]; then exec "$@"; fi
    dry_run=${TAER_DRY_RUN:-0}
    local extra=() arg
    for arg in "$@"; do
        if [[ $arg == --dry-run ]]; then dry_run=1; else extra+=("$arg"); fi
    done
    drop_empty_taer_vars

    store_dir=${TAER_STORE:-/data/store}
    patterns_dir=${TAER_PATTERNS:-/data/patterns}
    device=${TAER_DEVICE:-cuda}
    local need_shard=0 need_calibrate=0
    if [[ ! -f $store_dir/manifest.json ]]; then need_shard=1; fi
    # Patterns describe one store: a store sharded now gets fresh patterns too.
    if ((need_shard)) || [[ ! -f $patterns_dir/patterns.json ]]; then need_calibrate=1; fi

    model_dir='' tasks_file='' using_demo=0
    if ((need_shard || need_calibrate)); then choose_source; fi
    if ((need_calibrate && !using_demo)); then check_tasks_file; fi
    if ((need_shard)); then check_store_writable; else check_store_matches_model; fi
    build_serve_cmd "${extra[@]}"
    check_gpu
    if [[ -z ${TAER_API_KEY:-} ]]; then
        log "no TAER_API_KEY: anyone who can reach port ${TAER_PORT:-8000} can use the server"
    fi

    if ((using_demo)); then
        prepare_demo
    else
        shard_and_calibrate
    fi
    if is_true "$dry_run"; then
        run "${serve_cmd[@]}"
        exit 0
    fi
    log "running: $(quote "${serve_cmd[@]}")"
    exec "${serve_cmd[@]}"
}

main "$@"
