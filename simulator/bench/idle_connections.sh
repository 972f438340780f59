#!/usr/bin/env bash
# Memory per connected idle device: Sluice's RSS with CONNECTIONS idle MQTT
# connections minus its RSS with none, divided by CONNECTIONS.
#
# Usage: simulator/bench/idle_connections.sh [CONNECTIONS]   (default 10000)
# Raises the file-descriptor limit for itself and its children. Each device
# connects (spread over 10 s), publishes one message and then stays idle.
set -euo pipefail
connections=${1:-10000}
# Sluice and the simulator each hold one descriptor per connection.
want=$((connections + 1024))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  echo "need $want open files per process, the hard limit is $hard" >&2; exit 1
fi
ulimit -n "$want"
# shellcheck source=simulator/bench/common.sh
source "$(dirname "$0")/common.sh"
start_sluice SLUICE_BROKER__MAX_CONNECTIONS=$((connections + 100))

rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$sluice_pid/status"; }
connected() { curl -s "127.0.0.1:$metrics/metrics" | awk '$1 ~ /^sluice_connections\{/ { n += $2 } END { print n + 0 }'; }
# Warm up the paths a connection uses, so the baseline is not flattered.
"$bin/sluice-sim" --port "$mqtt" --devices 10 --rate 1 --count 1 --qos 1 --id-prefix warm- >/dev/null
sleep 2
base=$(rss_kib)

"$bin/sluice-sim" --port "$mqtt" --devices "$connections" --ramp-ms 10000 --rate 0.001 --qos 1 \
  --duration 40 --connect-timeout-secs 30 --id-prefix idle- >"$work/sim.txt" 2>&1 &
sim_pid=$!
for _ in $(seq 300); do [ "$(connected)" -ge "$connections" ] && break; sleep 0.2; done
sleep 5
n=$(connected)
with=$(rss_kib)
wait "$sim_pid" || true
per=$(python3 -c "print(round(($with - $base) / $n, 1))")
echo "| $(date -u +%F) | $(nproc) cores | $n idle connections | RSS $base KiB → $with KiB | $per KiB per connection |"
