#!/usr/bin/env bash
# Bytes per stored point, indexes included, at 10 million points: before and
# after compaction of the partition that holds them.
#
#   1. start `sluice serve` with its managed PostgreSQL (server-side
#      compaction off, so this script decides when it happens);
#   2. `sluice-copy-ceiling` writes DEVICES × METRICS series × POINTS each,
#      one point per series every STEP_MS, interleaved across series in time
#      order as live data arrives, by binary COPY into `points` in 10,000-row
#      transactions (the writer's encoding, batch size and order: each
#      transaction sorted by series and time), all in one past day's partition;
#   3. `sluice storage stats` (the open partition's layout: rows in arrival
#      order, btree on (series_id, time));
#   4. `sluice storage maintain` compacts the partition (sorted rows, BRIN);
#   5. `sluice storage stats` again.
#
# Usage: simulator/bench/bytes_per_point.sh [DEVICES] [METRICS] [POINTS] [STEP_MS]
#   (defaults 1000 devices × 10 metrics × 1000 points = 10,000,000 points,
#   10 s apart). Rollups are not written by this path: their cost per point
#   depends on how many points share a minute, see BENCHMARKS.md.
set -euo pipefail
devices=${1:-1000}
metrics_n=${2:-10}
points=${3:-1000}
step_ms=${4:-10000}
# shellcheck source=simulator/bench/common.sh
source "$(dirname "$0")/common.sh"
start_sluice SLUICE_INGEST__PARTITIONS__COMPACT_AFTER_HOURS=0

managed_pg
# Through the environment, not the command line, where `ps` would show the password.
export DATABASE_URL="$database_url"
rows=$((devices * metrics_n * points))
# Three days ago at midnight UTC: a closed partition, in every time zone.
start=$(date -u -d "3 days ago" +%Y-%m-%dT00:00:00Z)

"$bin/sluice-copy-ceiling" --rows "$rows" --devices "$devices" \
  --metrics "$metrics_n" --start "$start" --step-ms "$step_ms" --sorted >"$work/copy.json"
echo "loaded: $(cat "$work/copy.json")"
stats() { "$bin/sluice" storage stats; }
echo
echo "## $rows points, open partition layout ($(date -u +%F), $(nproc) cores)"
stats
echo
"$bin/sluice" storage maintain
echo
echo "## after compaction"
stats
