#!/usr/bin/env bash
# Sustained end-to-end ingest (MQTT → rules → PostgreSQL) measured beside the
# PostgreSQL ceiling for the same table, in one run on one machine and one
# database, ROUNDS times alternating (medians reported, as the ceilings
# drift ±50% on shared machines):
#
#   1. start a release `sluice serve` with its managed PostgreSQL in a temp dir;
#   2. each round (odd rounds a then b, even rounds b then a):
#      a. end to end: `sluice-sim` publishes as fast as the broker
#         acknowledges (QoS 1) from DEVICES devices for DURATION seconds; the
#         rate is points stored divided by the time from the first publish
#         until the last point is stored (polling the writer's counter, then
#         checked against the table), so the backlog's drain counts;
#         also the rate stored *while the simulator ran* (points the writer
#         committed between its start and its end, over its run time): the
#         simulator offers more than is stored, so the first figure is
#         mostly the spool's drain with the machine to itself afterwards,
#         and this one is the rate with the load generator and the edge
#         taking their share of the machine, a floor of the sustained rate;
#      b. the ceiling, into the same `points` table: `sluice-copy-ceiling`
#         writes as many rows as the round stored (at least 1,000,000) by
#         binary COPY in 10,000-row transactions, as the writer encodes them
#         (each transaction's rows sorted by series and time), on 1
#         connection and then on 2, series shaped like the run (DEVICES ×
#         points per message).
#      Before each measurement the points and rollup tables are emptied
#      (TRUNCATE) and a CHECKPOINT is taken, so each one starts from the same
#      state: an empty table and no checkpoint of an earlier one's WAL under way.
#
# Usage: simulator/bench/e2e_ingest.sh [DEVICES] [DURATION] [RATE] [METRICS] [ROUNDS]
#   (defaults 50 devices, 30 s, rate 0 = as fast as the broker acknowledges,
#   4 metrics, 3 rounds; RATE is messages per second per device, METRICS the
#   numeric fields per message besides `seq`, so each message carries
#   METRICS + 1 points). Devices connect anonymously (--allow-anonymous),
#   with the per-connection rate limit off.
# Loss is reported, not hidden: points sent (the simulator's count) vs
# points stored (`count(*)` of the table before the ceiling adds its rows).
# Prints one Markdown table row per round and one of medians, after a
# comment naming the columns, and the writer's Prometheus counters.
set -euo pipefail
devices=${1:-50}
duration=${2:-30}
rate=${3:-0}
metrics_per_msg=${4:-4}
rounds=${5:-3}
# shellcheck source=simulator/bench/common.sh
source "$(dirname "$0")/common.sh"
start_sluice
managed_pg
points_per_msg=$((metrics_per_msg + 1))
series=$((devices * points_per_msg))

count() { psql_ -c "SELECT count(*) FROM points"; }
fresh() { psql_ -c "TRUNCATE points, rollup_1m, rollup_1h" && psql_ -c "CHECKPOINT"; }
# The writer's counter, not count(*): a scan of the growing table every half
# second would take CPU from the run being measured.
written() { prom_samples '^sluice_points_written_total' | awk '{ n += $2 } END { print n + 0 }'; }

# end_to_end: one simulator run into the emptied table; sets e2e (points/s),
# under_load (points/s stored while the simulator ran), stored, sent_points.
end_to_end() {
  fresh
  local before last last_change now t0 at_sim_end
  before=$(written)
  t0=$(date +%s.%N)
  "$bin/sluice-sim" --port "$mqtt" --devices "$devices" --rate "$rate" --qos 1 \
    --metrics "$metrics_per_msg" --duration "$duration" --json >"$work/sim.json"
  last=$(written); last_change=$(date +%s.%N)
  at_sim_end=$last
  while true; do
    sleep 0.5
    now=$(written)
    if [ "$now" != "$last" ]; then last=$now; last_change=$(date +%s.%N); continue; fi
    python3 -c "import sys; sys.exit(0 if $(date +%s.%N) - $last_change > 3 else 1)" && break
  done
  stored=$(count)
  [ "$stored" = "$((last - before))" ] ||
    echo "warning: the writer counted $((last - before)) points, the table holds $stored" >&2
  e2e=$(python3 -c "print(round($stored / ($last_change - $t0)))")
  sent_points=$(python3 -c "import json; print(json.load(open('$work/sim.json'))['points'])")
  under_load=$(python3 -c "
import json
print(round(($at_sim_end - $before) / json.load(open('$work/sim.json'))['elapsed_secs']))")
}

# ceiling CONNECTIONS ROWS → rows/s: as many rows as the round stored,
# series shaped like the run's, 1 s between a series' points from an hour ago.
ceiling_start=$(date -u -d "@$(($(date +%s) - 3600))" +%Y-%m-%dT%H:%M:%SZ)
ceiling() {
  fresh
  DATABASE_URL=$database_url "$bin/sluice-copy-ceiling" --rows "$2" --devices "$devices" \
    --metrics "$points_per_msg" --connections "$1" --batch-rows 10000 --start "$ceiling_start" \
    --step-ms 1000 --sorted >"$work/ceiling.json" 2>>"$work/ceiling.log"
  python3 -c "import json; print(round(json.load(open('$work/ceiling.json'))['rows_per_sec']))"
}

ratio() { python3 -c "print(f'{$1 / $2:.0%}')"; }
load="$devices devices × rate $rate, $points_per_msg points/msg, QoS 1, ${duration}s"
echo "# | date | cores | load | round | points sent / stored | end to end points/s | binary COPY 1 conn rows/s | e2e / 1 conn | binary COPY 2 conns rows/s | e2e / 2 conns | stored/s while the sim ran | that / 2 conns |"
: >"$work/rounds"
# Odd rounds measure end to end first, even rounds the ceilings first (as
# many rows as the round before stored), so neither side always inherits the
# other's leftovers (a checkpoint, autovacuum, a warm cache).
rows=1000000
for round in $(seq "$rounds"); do
  if [ $((round % 2)) -eq 1 ]; then
    end_to_end
    rows=$((stored > 1000000 ? stored : 1000000))
    copy1=$(ceiling 1 "$rows")
    copy2=$(ceiling 2 "$rows")
  else
    copy1=$(ceiling 1 "$rows")
    copy2=$(ceiling 2 "$rows")
    end_to_end
    rows=$((stored > 1000000 ? stored : 1000000))
  fi
  loss=$(python3 -c "
d = $sent_points - $stored
print('none lost' if d == 0 else f'{d:,} lost' if d > 0 else f'{-d:,} more stored than sent')")
  echo "$e2e $copy1 $copy2 $under_load" >>"$work/rounds"
  echo "| $(date -u +%F) | $(nproc) cores | $load | $round | $sent_points / $stored, $loss | $e2e | $copy1 | $(ratio "$e2e" "$copy1") | $copy2 | $(ratio "$e2e" "$copy2") | $under_load | $(ratio "$under_load" "$copy2") |"
done
# Medians of each column; the ratios are the medians of each round's own
# ratio, as only a round's measurements share the machine's state.
read -r m_e2e m_copy1 m_copy2 m_load m_r1 m_r2 m_rl < <(python3 -c "
import statistics
rows = [list(map(int, l.split())) for l in open('$work/rounds')]
med = [round(statistics.median(c)) for c in zip(*rows)]
r1 = statistics.median(e / c1 for e, c1, _, _ in rows)
r2 = statistics.median(e / c2 for e, _, c2, _ in rows)
rl = statistics.median(u / c2 for _, _, c2, u in rows)
print(*med, f'{r1:.0%}', f'{r2:.0%}', f'{rl:.0%}')")
echo "| $(date -u +%F) | $(nproc) cores | $load | **median of $rounds** | | **$m_e2e** | $m_copy1 | **$m_r1** | $m_copy2 | **$m_r2** | **$m_load** | **$m_rl** |"
echo "# writer: $(prom_samples '^sluice_(points_written|write_errors|dead_letters_written|rows_refused|rows_lost)_total' |
  awk '{ printf "%s%s %s", sep, $1, $2; sep = "; " }')"
