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
root=$(cd "$(dirname "$0")/../.." && pwd)
devices=${1:-50}
duration=${2:-15}
rounds=${3:-3}
cd "$root"
cargo build --release -q -p sluice -p sluice-simulator
bin="${CARGO_TARGET_DIR:-$root/target}/release"

work=$(mktemp -d /tmp/sluice-bench-XXXXXX)
chmod 755 "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(free_port); ws=$(free_port); grpc=$(free_port); metrics=$(free_port)
sluice_pid=""
stop_sluice() {
  if [ -n "$sluice_pid" ]; then kill -TERM "$sluice_pid" 2>/dev/null || true; wait "$sluice_pid" 2>/dev/null || true; fi
  sluice_pid=""
}
trap 'stop_sluice; rm -rf "$work"' EXIT

# start_sluice DURABLE STARTS [STORE]: one server per run, on the same managed
# PostgreSQL. STORE=false turns the rules off, so messages are acked and
# dropped (counted) without reaching the database: the edge and spool alone.
start_sluice() {
  SLUICE_RULES__BUILTIN_TELEMETRY=${3:-true} SLUICE_RULES__STORE_UNMATCHED=${3:-true} \
  SLUICE_BROKER__DURABLE_ACKS=$1 SLUICE_BROKER__MAX_PUBLISH_RATE=0 \
    "$bin/sluice" serve --allow-anonymous --data-dir "$work/data" --rules "$work/rules" \
    --mqtt-listen "127.0.0.1:$mqtt" --ws-listen "127.0.0.1:$ws" \
    --grpc-listen "127.0.0.1:$grpc" --metrics-listen "127.0.0.1:$metrics" \
    >>"$work/sluice.log" 2>&1 &
  sluice_pid=$!
  for _ in $(seq 600); do
    [ "$(grep -c "sluice is ready" "$work/sluice.log")" -ge "$2" ] && return 0
    sleep 0.1
  done
  cat "$work/sluice.log"; exit 1
}

# run_sim RATE → the simulator's JSON summary
run_sim() {
  "$bin/sluice-sim" --port "$mqtt" --devices "$devices" --rate "$1" --qos 1 --duration "$duration" --json
}
field() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2]))" "$1" "$2"; }

starts=0
durable=(); immediate=()
for round in $(seq "$rounds"); do
  for mode in true false; do
    starts=$((starts + 1))
    start_sluice "$mode" "$starts"
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
starts=$((starts + 1))
start_sluice true "$starts"
out=$(run_sim "$half")
stop_sluice
lat=$(field "$out" "'p50 {p50} / p90 {p90} / p99 {p99} / max {max} ms'.format(**d['puback_latency_ms'])")
achieved=$(field "$out" "round(d['msgs_per_sec'])")
starts=$((starts + 1))
start_sluice true "$starts" false
out=$(run_sim "$half")
stop_sluice
edge_lat=$(field "$out" "'p50 {p50} / p90 {p90} / p99 {p99} / max {max} ms'.format(**d['puback_latency_ms'])")

echo "| $(date -u +%F) | $(nproc) cores | $devices devices, QoS 1, ${duration}s × $rounds rounds | durable $d msg/s (${durable[*]}) | on receipt $i msg/s (${immediate[*]}) | $ratio |"
echo "| $(date -u +%F) | $(nproc) cores | durable acks at half load: $achieved msg/s from $devices devices | with storage: $lat | rules off (edge + spool only): $edge_lat |"
