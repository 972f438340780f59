#!/usr/bin/env bash
# What durable acknowledgements cost: QoS 1 throughput with PUBACK after the
# spool's fsync (broker.durable_acks = true, the default) against PUBACK on
# receipt (false), alternating, ROUNDS rounds each, in one run on one
# machine; then PUBACK latency percentiles with durable acks at half of the
# durable median rate.
#
# Usage: simulator/bench/durable_acks.sh [DEVICES] [DURATION] [ROUNDS]
#   (defaults 50 devices, 15 s per run, 3 rounds). Each device keeps up to
# 100 QoS 1 messages in flight. Prints Markdown rows for BENCHMARKS.md.
set -euo pipefail
devices=${1:-50}
duration=${2:-15}
rounds=${3:-3}
# shellcheck source=simulator/bench/common.sh
source "$(dirname "$0")/common.sh"

# with_storage DURABLE [STORE]: STORE=false turns the rules off, so messages
# are acked and dropped (counted) without reaching the database: the edge
# and spool alone.
with_storage() {
  start_sluice SLUICE_BROKER__DURABLE_ACKS="$1" \
    SLUICE_RULES__BUILTIN_TELEMETRY="${2:-true}" SLUICE_RULES__STORE_UNMATCHED="${2:-true}"
}

# run_sim RATE → the simulator's JSON summary
run_sim() {
  "$bin/sluice-sim" --port "$mqtt" --devices "$devices" --rate "$1" --qos 1 --duration "$duration" --json
}
field() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2]))" "$1" "$2"; }

durable=(); immediate=()
for round in $(seq "$rounds"); do
  for mode in true false; do
    with_storage "$mode"
    out=$(run_sim 0)
    stop_sluice
    rate=$(field "$out" "d['msgs_per_sec']")
    p99=$(field "$out" "d['puback_latency_ms']['p99']")
    echo "round $round durable_acks=$mode: $rate msg/s, PUBACK p99 $p99 ms" >&2
    if [ "$mode" = true ]; then durable+=("$rate"); else immediate+=("$rate"); fi
  done
done
median() { python3 -c "import statistics,sys; print(round(statistics.median(map(float, sys.argv[1:]))))" "$@"; }
d=$(median "${durable[@]}"); i=$(median "${immediate[@]}")
ratio=$(python3 -c "print(f'{$d / $i:.0%}')")

half=$(python3 -c "print($d / 2 / $devices)")
with_storage true
out=$(run_sim "$half")
stop_sluice
lat=$(field "$out" "'p50 {p50} / p90 {p90} / p99 {p99} / max {max} ms'.format(**d['puback_latency_ms'])")
achieved=$(field "$out" "round(d['msgs_per_sec'])")
with_storage true false
out=$(run_sim "$half")
stop_sluice
edge_lat=$(field "$out" "'p50 {p50} / p90 {p90} / p99 {p99} / max {max} ms'.format(**d['puback_latency_ms'])")

echo "| $(date -u +%F) | $(nproc) cores | $devices devices, QoS 1, ${duration}s × $rounds rounds | durable $d msg/s (${durable[*]}) | on receipt $i msg/s (${immediate[*]}) | $ratio |"
echo "| $(date -u +%F) | $(nproc) cores | durable acks at half load: $achieved msg/s from $devices devices | with storage: $lat | rules off (edge + spool only): $edge_lat |"
