#!/usr/bin/env bash
# Sustained end-to-end ingest (MQTT → rules → PostgreSQL) measured beside the
# PostgreSQL ceiling for the same table, in one run on one machine and one
# database:
#
#   1. start a release `sluice serve` with its managed PostgreSQL in a temp dir;
#   2. `sluice-sim` publishes as fast as the broker acknowledges (QoS 1) from
#      DEVICES devices for DURATION seconds; the run's rate is points stored
#      divided by the time from the first publish until the last point is
#      stored (measured by polling the table);
#   3. the ceiling, into the same `points` table (emptied first, as it was
#      when the run started): `sluice-copy-ceiling` writes max(points stored, 1,000,000) rows
#      by binary COPY in 10,000-row transactions, as the writer encodes them,
#      on 1 connection and then on 2, series shaped like the run (DEVICES ×
#      points per message); then `psql \copy` of as many rows as CSV, the
#      figure earlier versions of this script reported, for continuity.
#
# Usage: simulator/bench/e2e_ingest.sh [DEVICES] [DURATION] [RATE] [METRICS]
#   (defaults 50 devices, 30 s, rate 0 = as fast as the broker acknowledges,
#   4 metrics; RATE is messages per second per device, METRICS the numeric
#   fields per message besides `seq`, so each message carries METRICS + 1
#   points). Devices connect anonymously (--allow-anonymous), with the
#   per-connection rate limit off.
# Loss is reported, not hidden: points sent (the simulator's count) vs
# points stored (`count(*)` of the table before the ceiling adds its rows).
# Prints the writer's Prometheus counters and one Markdown table row, after a
# comment naming its columns.
set -euo pipefail
devices=${1:-50}
duration=${2:-30}
rate=${3:-0}
metrics_per_msg=${4:-4}
# shellcheck source=simulator/bench/common.sh
source "$(dirname "$0")/common.sh"
start_sluice
managed_pg
count() { psql_ -c "SELECT count(*) FROM points"; }

t0=$(date +%s.%N)
"$bin/sluice-sim" --port "$mqtt" --devices "$devices" --rate "$rate" --qos 1 \
  --metrics "$metrics_per_msg" --duration "$duration" --json >"$work/sim.json"
last=$(count); last_change=$(date +%s.%N)
while true; do
  sleep 0.5
  now=$(count)
  if [ "$now" != "$last" ]; then last=$now; last_change=$(date +%s.%N); continue; fi
  python3 -c "import sys; sys.exit(0 if $(date +%s.%N) - $last_change > 3 else 1)" && break
done
stored=$last
received=$(prom_samples '^sluice_messages_received_total' | awk '{ n += $2 } END { print n + 0 }')
writer=$(prom_samples '^sluice_(points_written|write_errors|dead_letters_written|rows_refused|rows_lost)_total' |
  awk '{ printf "%s%s %s", sep, $1, $2; sep = "; " }')
e2e=$(python3 -c "print(round($stored / ($last_change - $t0)))")
sent_points=$(python3 -c "import json; print(json.load(open('$work/sim.json'))['points'])")
loss=$(python3 -c "
d = $sent_points - $stored
print('none lost' if d == 0 else f'{d:,} lost' if d > 0 else f'{-d:,} more stored than sent')")

# The ceiling: as many rows as the run stored (at least 1M), series shaped
# like the run's, into the same table, emptied (TRUNCATE) before each
# measurement, so every measurement, the end-to-end run's included, fills
# the same empty table with as many rows. Each gets its own time range (1 s
# between a series' points, from an hour ago), so none repeats another's keys.
rows=$((stored > 1000000 ? stored : 1000000))
points_per_msg=$((metrics_per_msg + 1))
series=$((devices * points_per_msg))
span=$(((rows + series - 1) / series)) # seconds per series
start1=$(($(date +%s) - 3600))
start2=$((start1 + span))
rfc3339() { date -u -d "@$1" +%Y-%m-%dT%H:%M:%SZ; }
ceiling() { # CONNECTIONS START → rows/s
  psql_ -c "TRUNCATE points"
  DATABASE_URL=$database_url "$bin/sluice-copy-ceiling" --rows "$rows" --devices "$devices" \
    --metrics "$points_per_msg" --connections "$1" --batch-rows 10000 --start "$(rfc3339 "$2")" \
    --step-ms 1000 >"$work/ceiling.json" 2>>"$work/ceiling.log"
  python3 -c "import json; print(round(json.load(open('$work/ceiling.json'))['rows_per_sec']))"
}
copy1=$(ceiling 1 "$start1")
copy2=$(ceiling 2 "$start2")

# psql \copy CSV of as many rows into the first ceiling run's time range
# (its partitions exist), half a second after each of its points.
psql_ -F, -c "SELECT id, split_part(device_id, '-', 2), substr(metric, 2) FROM series
  WHERE device_id LIKE 'ceiling-%'" >"$work/series.csv"
python3 - "$rows" "$devices" "$points_per_msg" "$start1" "$work/series.csv" >"$work/points.csv" <<'PY'
import datetime, sys
rows, devices, metrics, start = (int(a) for a in sys.argv[1:5])
ids = {}
for line in open(sys.argv[5]):
    sid, d, m = line.strip().split(",")
    ids[int(d), int(m)] = sid
series = [ids[d, m] for d in range(devices) for m in range(metrics)]
t0 = datetime.datetime.fromtimestamp(start, datetime.timezone.utc)
out = sys.stdout
for k in range(-(-rows // len(series))):
    t = (t0 + datetime.timedelta(seconds=k + 0.5)).isoformat()
    for i, sid in enumerate(series[: rows - k * len(series)]):
        out.write(f"{sid},{t},{20 + (k * 7 + i) % 1000 / 100:.2f}\n")
PY
psql_ -c "TRUNCATE points"
c0=$(date +%s.%N)
psql_ -c "\\copy points (series_id, time, value) FROM '$work/points.csv' CSV"
c1=$(date +%s.%N)
csv=$(python3 -c "print(round($rows / ($c1 - $c0)))")
total=$(count)
[ "$total" = "$rows" ] || echo "warning: points holds $total rows, expected $rows" >&2

ratio() { python3 -c "print(f'{$1 / $2:.0%}')"; }
echo "# writer: ${writer:-no writer metrics}"
echo "# ceiling: $rows rows per measurement, $series series ($devices devices × $points_per_msg), 10,000-row transactions"
echo "# | date | cores | load | points sent/stored | end to end points/s | binary COPY 1 conn rows/s | ratio e2e/1conn | binary COPY 2 conns rows/s | ratio e2e/2conn | psql \\copy CSV rows/s |"
echo "| $(date -u +%F) | $(nproc) cores | $devices devices × rate $rate, $points_per_msg points/msg, QoS 1, ${duration}s | $sent_points sent / $stored stored, $loss (messages received $received) | $e2e | $copy1 | $(ratio "$e2e" "$copy1") | $copy2 | $(ratio "$e2e" "$copy2") | $csv |"
