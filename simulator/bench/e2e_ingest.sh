#!/usr/bin/env bash
# Sustained end-to-end ingest (MQTT → rules → PostgreSQL) measured beside the
# PostgreSQL ceiling for the same table, in one run on one machine:
#
#   1. start a release `sluice serve` with its managed PostgreSQL in a temp dir;
#   2. `sluice-sim` publishes as fast as the broker acknowledges (QoS 1) from
#      DEVICES devices for DURATION seconds; the run's rate is points stored
#      divided by the time from the first publish until the last point is
#      stored (measured by polling the table);
#   3. `psql \copy` of the same number of rows, as CSV, into the same `points`
#      table (narrow rows, same index, already holding the run's rows): the
#      ceiling; and the same into an empty table of the same definition.
#
# Usage: simulator/bench/e2e_ingest.sh [DEVICES] [DURATION] [RATE]
#   (defaults 50 devices, 30 s, rate 0 = as fast as the broker acknowledges;
#   RATE is messages per second per device). Each message carries 5 points.
# Loss is reported, not hidden: points sent vs stored. Devices connect
# anonymously (--allow-anonymous), with the per-connection rate limit off.
# Prints one Markdown table row for BENCHMARKS.md.
set -euo pipefail
devices=${1:-50}
duration=${2:-30}
rate=${3:-0}
# shellcheck source=simulator/bench/common.sh
source "$(dirname "$0")/common.sh"
start_sluice

export PGPASSWORD
PGPASSWORD=$(cat "$work/data/pg-password")
pgport=$(sed -n 4p "$work/data/pg/postmaster.pid")
psql_() { psql -X -q -t -A -h 127.0.0.1 -p "$pgport" -U postgres -d sluice "$@"; }
count() { psql_ -c "SELECT count(*) FROM points"; }

t0=$(date +%s.%N)
"$bin/sluice-sim" --port "$mqtt" --devices "$devices" --rate "$rate" --qos 1 --duration "$duration" --json >"$work/sim.json"
last=$(count); last_change=$(date +%s.%N)
while true; do
  sleep 0.5
  now=$(count)
  if [ "$now" != "$last" ]; then last=$now; last_change=$(date +%s.%N); continue; fi
  python3 -c "import sys; sys.exit(0 if $(date +%s.%N) - $last_change > 3 else 1)" && break
done
stored=$last
metric() { curl -s "127.0.0.1:$metrics/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
received=$(curl -s "127.0.0.1:$metrics/metrics" | awk '$1 ~ /^sluice_messages_received_total/ { n += $2 } END { print n + 0 }')
e2e=$(python3 -c "print(round($stored / ($last_change - $t0)))")
sent_points=$(python3 -c "import json; print(json.load(open('$work/sim.json'))['points'])")

# The same number of rows, shaped like the simulator's: 1,000 series, one row a second each.
python3 - "$stored" >"$work/points.csv" <<'PY'
import datetime, sys
start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
for i in range(int(sys.argv[1])):
    t = start + datetime.timedelta(seconds=i // 1000)
    print(f"{i % 1000 + 1},{t.isoformat()},{i * 0.5}")
PY
c0=$(date +%s.%N)
psql_ -c "\\copy points (series_id, time, value) FROM '$work/points.csv' CSV"
c1=$(date +%s.%N)
ceiling=$(python3 -c "print(round($stored / ($c1 - $c0)))")
psql_ -c "CREATE TABLE points_ceiling (LIKE points INCLUDING ALL)"
c0=$(date +%s.%N)
psql_ -c "\\copy points_ceiling (series_id, time, value) FROM '$work/points.csv' CSV"
c1=$(date +%s.%N)
ceiling_empty=$(python3 -c "print(round($stored / ($c1 - $c0)))")
ratio=$(python3 -c "print(f'{$e2e / $ceiling:.0%}')")
echo "| $(date -u +%F) | $(nproc) cores | $devices devices × rate $rate, QoS 1, ${duration}s | $sent_points sent / $stored stored (messages received $received) | $e2e | $ceiling | $ratio | $ceiling_empty |"
