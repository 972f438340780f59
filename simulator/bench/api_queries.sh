#!/usr/bin/env bash
# The query API's figures on a known data set, in one run on one machine:
#
#   1. start a release `sluice serve` with its managed PostgreSQL in a temp dir;
#   2. load DEVICES × 10 metrics × POINTS points through MQTT (`sluice-api-bench
#      load`: timestamps spread over the last 30 days, so the writer fills
#      the rollups and the latest values as it would for live data), then
#      compact every closed partition (`sluice storage maintain`) and
#      VACUUM ANALYZE, as the server's upkeep and autovacuum would;
#   3. time LatestPoints (every device × metric), AggregatePoints (one series,
#      30 days, 1-hour buckets) and StreamPoints of the devices `bench-00*`
#      (100 devices × 10 metrics × POINTS points), and the same stream query
#      in psql (output to /dev/null), ROUNDS times alternating;
#   4. Subscribe: publish at RATE points/s (ts = time of publishing) while a
#      subscriber follows 10 devices; latency publish → subscriber, with the
#      default flush interval (10 ms) and with 5 ms.
#
# Usage: simulator/bench/api_queries.sh [DEVICES] [POINTS] [RATE] [ROUNDS]
#   (defaults 1000 devices, 1000 points per series, 100000 points/s, 3 rounds)
# Prints a JSON object per phase and a Markdown summary. KEEP=1 keeps the
# loaded database; WORK=DIR runs the measurements again on it.
set -euo pipefail
devices=${1:-1000}
points=${2:-1000}
rate=${3:-100000}
rounds=${4:-3}
# shellcheck source=simulator/bench/common.sh
source "$(dirname "$0")/common.sh"
start_sluice
managed_pg
bench() { "$bin/sluice-api-bench" --mqtt-port "$mqtt" --grpc-port "$grpc" --devices "$devices" "$@"; }

if [ ! -f "$work/load.json" ]; then
  echo "loading $devices devices × 10 metrics × $points points ..." >&2
  bench load --points "$points" --database-url "$database_url" >"$work/load.json"
  # The steady state of data this old: every closed partition compacted
  # (sorted by series and time, BRIN-indexed), statistics fresh. Done now
  # rather than by the server's upkeep (one partition a minute), which
  # would otherwise run during the measurements.
  stop_sluice
  "$bin/sluice" storage maintain --data-dir "$work/data" >"$work/maintain.log" 2>&1
  start_sluice
  managed_pg # the managed PostgreSQL has a new port
  psql_ -c "VACUUM ANALYZE" >/dev/null
fi
cat "$work/load.json"
# LOAD_ONLY=1 (with KEEP=1): stop here, to measure later on a quiet machine.
[ "${LOAD_ONLY:-0}" = 1 ] && exit 0

# The query StreamPoints runs for the prefix, with the series ids inlined
# as a constant (the server binds them, unprepared, so it is planned the same).
ids=$(psql_ -c "SELECT array_agg(id) FROM series WHERE starts_with(device_id, 'bench-00')")
stream_sql="SELECT series_id, time, value FROM points
  WHERE series_id = ANY('$ids'::integer[]) AND time >= '1900-01-01' AND time < '9999-01-01'
  ORDER BY series_id, time"
for round in $(seq "$rounds"); do
  bench queries --repeat 30 --stream-repeat 1 | tee "$work/queries-$round.json"
  t0=$(date +%s.%N)
  psql_ -o /dev/null -c "$stream_sql"
  t1=$(date +%s.%N)
  python3 -c "print('{\"psql_stream_seconds\": %.3f}' % ($t1 - $t0))" | tee "$work/psql-$round.json"
done

bench subscribe --rate "$rate" --seconds 20 | tee "$work/subscribe-default.json"
stop_sluice
start_sluice SLUICE_INGEST__FLUSH_INTERVAL_MS=5
bench subscribe --rate "$rate" --seconds 20 | tee "$work/subscribe-5ms.json"

python3 - "$work" "$rounds" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
q = [json.load(open(f"{work}/queries-{r}.json")) for r in range(1, rounds + 1)]
p = [json.load(open(f"{work}/psql-{r}.json"))["psql_stream_seconds"] for r in range(1, rounds + 1)]
latest = statistics.median(x["latest_points"]["time"]["median_ms"] for x in q)
agg = statistics.median(x["aggregate_points"]["time"]["median_ms"] for x in q)
runs = [x["stream_points"]["runs"][0] for x in q]
n = runs[0]["points"]
stream_rate = statistics.median(r["points_per_sec"] for r in runs)
psql_rate = statistics.median(n / s for s in p)
print("| what | median of rounds |")
print("|---|---|")
print(f"| LatestPoints, {q[0]['latest_points']['points']} series | {latest:.1f} ms |")
print(f"| AggregatePoints, 30 d at 1 h ({q[0]['aggregate_points']['buckets']} buckets) | {agg:.2f} ms |")
print(f"| StreamPoints, {n} points | {stream_rate:,.0f} points/s |")
print(f"| the same query in psql (to /dev/null) | {psql_rate:,.0f} rows/s |")
for name in ("default", "5ms"):
    s = json.load(open(f"{work}/subscribe-{name}.json"))
    l = s["latency_ms"]
    print(f"| Subscribe at {s['rate_points_per_sec']:,} points/s, flush {name}: p50 / p99 / max | "
          f"{l['p50']} / {l['p99']} / {l['max']} ms ({s['received_points']} points, gaps {s['gaps']}) |")
PY
