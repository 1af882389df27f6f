#!/usr/bin/env bash
# Mixed traffic at equal expert memory, bfloat16 experts against int8 experts (issue 13's last
# measure): the demo checkpoint sharded both ways and calibrated on each store, then `taer bench
# cluster` (one taer serve, fifo and switch-aware schedulers) on each, both computing in bfloat16.
# At keep 25% one pattern is 4 of the demo's 16 experts a layer: the bfloat16 server gets 4 slots a
# layer, the int8 server 8 (an int8 slot takes 0.51x a bfloat16 one: the same bytes within 2%).
# Usage: scripts/mixed_traffic_8bit.sh [WORK_DIR] (default /tmp/taer-mixed-8bit; needs `make run`'s
# demo in .taer, or DATA=dir).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/taer-mixed-8bit}
data=${DATA:-.taer}
tasks=$data/demo/tasks/tasks.yaml
bin=.venv/bin
mkdir -p "$work"
for dtype in bfloat16 int8; do
    [ -f "$work/store-$dtype/manifest.json" ] ||
        "$bin/taer" shard "$data/demo/model" "$work/store-$dtype" --expert-dtype "$dtype"
    [ -f "$work/patterns-$dtype/patterns.json" ] ||
        "$bin/taer" calibrate "$work/store-$dtype" "$tasks" --out "$work/patterns-$dtype"
done
export TAER_DTYPE=bfloat16
for pair in bfloat16:2 int8:4; do  # --replica-slots N gives the one server 2N slots a layer
    dtype=${pair%%:*}
    "$bin/taer" bench cluster --store "$work/store-$dtype" --patterns "$work/patterns-$dtype" \
        --tasks "$tasks" --configurations fifo,switch-aware --keep 0.25 --replica-slots "${pair##*:}" \
        --threads 1 --out "$work/out-$dtype"
done
