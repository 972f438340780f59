#!/usr/bin/env bash
# A database outage under load: "after a 60-second database outage under
# half of the sustained load, the backlog drains at ≥ 2× the incoming rate
# and nothing is lost or duplicated (counted, not assumed)".
#
#   1. start a release `sluice serve` with its managed PostgreSQL in a temp
#      dir, and `sluice-sim` in the background: DEVICES devices × RATE
#      messages/s, QoS 1, for 30 + OUTAGE + 120 s (each message carries a
#      per-device `seq`, 0, 1, 2, …, and METRICS more numeric fields);
#   2. 30 s in, stop PostgreSQL (`pg_ctl stop -m fast`); OUTAGE s later start
#      it again, on the same port with the same options Sluice started it
#      with;
#   3. every second, sample the writer's `sluice_points_written_total` and the Prometheus gauges
#      `sluice_spool_pending_bytes` and `sluice_spool_oldest_pending_seconds`
#      into a CSV (kept at $SAMPLES_CSV, default /tmp/db_outage-samples.csv);
#   4. once the simulator is done and storage stopped growing, count per
#      device the stored `seq` points: rows, distinct values, max. Messages
#      are seq 0..n-1 per device, so lost = sent − Σ distinct (and
#      max + 1 − distinct are the gaps within a device), duplicates =
#      Σ rows − Σ distinct.
#
# Incoming points/s is the offered load: RATE × DEVICES × (METRICS + 1).
# Drain points/s is points stored per second from the restart (the count
# taken as soon as `pg_ctl start` returns; nothing is stored during the
# outage) until the backlog is gone: the first sample where the stored count
# reached what the simulator had sent by then, less one second of it (sent
# by then = its achieved points/s × time since it started). Should that
# never happen, the first sample where the oldest pending spool message is
# no older than in normal running (max(2 s, 1.5 × its largest value before
# the outage); the gauge moves in steps of about 1 MiB of spool, so it is
# coarse at low rates). Ratio = drain / incoming (the goal: ≥ 2). The
# time between the restart and the writer's next retry (its backoff grows
# to 10 s) counts against the drain.
#
# Which PostgreSQL: the managed one Sluice starts (simplest, and the one the
# other benchmarks measure). Sluice does not restart it by itself
# (ingest/src/managed.rs starts it once with `pg_ctl start` and stops it at
# shutdown), so this script stops and starts it with the `pg_ctl` of the
# running server's own binaries, as the cluster directory's owner: when we
# are root, Sluice runs the server as the `postgres` user (PostgreSQL
# refuses root), and so does this script, through `runuser`. At shutdown
# Sluice stops the restarted server as it would have stopped its own.
#
# Usage: simulator/bench/db_outage.sh [DEVICES] [RATE_PER_DEVICE] [OUTAGE_SECS] [METRICS]
#   (defaults 50 devices, 200 msg/s each, 60 s, 4 metrics). Prints one
#   Markdown table row for BENCHMARKS.md, after a comment naming its columns.
set -euo pipefail
devices=${1:-50}
rate=${2:-200}
outage=${3:-60}
metrics_per_msg=${4:-4}
samples_keep=${SAMPLES_CSV:-/tmp/db_outage-samples.csv}
# shellcheck source=simulator/bench/common.sh
source "$(dirname "$0")/common.sh"
start_sluice
managed_pg

cluster="$work/data/pg"
pg_pid=$(head -1 "$cluster/postmaster.pid")
pgbin=$(dirname "$(readlink -f "/proc/$pg_pid/exe")")
owner=$(stat -c %U "$cluster")
# pg_ctl_ ARGS...: the server's own pg_ctl, as the cluster's owner, with a
# working directory and HOME that user can enter, and no PG* variables.
pg_ctl_() {
  local as=()
  if [ "$(id -u)" = 0 ] && [ "$owner" != root ]; then as=(runuser -u "$owner" --); fi
  (cd "$cluster" && "${as[@]}" env -u PGPASSWORD LC_ALL=C HOME="$cluster" "$pgbin/pg_ctl" "$@")
}

sim_pid=""
sampler_pid=""
cleanup() {
  [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null || true
  [ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null || true
  stop_sluice
  # Should Sluice have died, the server must not outlive its data directory.
  if pg_ctl_ status -D "$cluster" >/dev/null 2>&1; then
    pg_ctl_ stop -D "$cluster" -m immediate -w >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
sleep_until() { sleep "$(awk -v t="$1" -v n="$(now)" 'BEGIN { d = t - n; if (d < 0) d = 0; printf "%.3f", d }')"; }
after() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a + b }'; }
gauge() { awk -v m="$1" '$1 == m { print $2 }' <<<"$2"; }

# Points committed so far, from the writer's counter: a count(*) of a table
# of millions of rows every second would take a core from the run it measures.
written() { prom_samples '^sluice_points_written_total$' | awk '{ print $2 }'; }

samples="$work/samples.csv"
# One sample a second, in seconds since the simulator started.
sample() {
  local next ts prom
  next=$(now)
  echo "t,stored_points,spool_pending_bytes,spool_oldest_pending_seconds" >"$samples"
  while [ ! -e "$work/stop-sampling" ]; do
    ts=$(now)
    prom=$(curl -s --max-time 2 "127.0.0.1:$metrics/metrics" || true)
    c=$(gauge sluice_points_written_total "$prom")
    echo "$(after "$ts" "-$t0"),$c,$(gauge sluice_spool_pending_bytes "$prom"),$(gauge sluice_spool_oldest_pending_seconds "$prom")" >>"$samples"
    next=$(awk -v a="$next" -v n="$(now)" 'BEGIN { a += 1; if (a < n) a = n; printf "%.3f", a }')
    sleep_until "$next"
  done
}

t0=$(now)
"$bin/sluice-sim" --port "$mqtt" --devices "$devices" --rate "$rate" --qos 1 \
  --metrics "$metrics_per_msg" --duration $((30 + outage + 120)) --json \
  >"$work/sim.json" 2>"$work/sim.log" &
sim_pid=$!
sample &
sampler_pid=$!

sleep_until "$(after "$t0" 30)"
echo "$(date -u +%T) stopping PostgreSQL for $outage s" >&2
pg_ctl_ stop -D "$cluster" -m fast -w >/dev/null
t_stop=$(now)
sleep_until "$(after "$t_stop" "$outage")"
echo "$(date -u +%T) starting PostgreSQL again" >&2
pg_ctl_ start -D "$cluster" -w -t 60 -l "$work/data/pg.log" \
  -o "-p $pgport -c listen_addresses=127.0.0.1 -c unix_socket_directories=''" >/dev/null
t_restart=$(now)
c_restart=$(written)

sim_status=0
wait "$sim_pid" || sim_status=$?
sim_pid=""
echo "$(date -u +%T) simulator done (exit status $sim_status); waiting for storage to settle" >&2
# Settled: the count unchanged for 5 s (at most 10 minutes).
last=""; stable=0
for _ in $(seq 600); do
  c=$(written)
  if [ "$c" = "$last" ]; then stable=$((stable + 1)); else stable=0; last=$c; fi
  [ "$stable" -ge 5 ] && break
  sleep 1
done
touch "$work/stop-sampling"
wait "$sampler_pid" || true
sampler_pid=""
cp "$samples" "$samples_keep"
echo "samples: $samples_keep" >&2

psql_ -F, -c "SELECT s.device_id, count(*), count(DISTINCT p.value), max(p.value)
  FROM points p JOIN series s ON s.id = p.series_id WHERE s.metric = 'seq' GROUP BY 1" >"$work/seq.csv"
prom_samples '^sluice_(points_written|write_errors|spool_full_waits|rows_refused|rows_lost|dead_letters_written)_total' >&2 || true

python3 - "$work/sim.json" "$samples" "$work/seq.csv" "$devices" "$rate" "$metrics_per_msg" \
  "$outage" "$(after "$t_stop" "-$t0")" "$(after "$t_restart" "-$t0")" "$sim_status" "$last" "$(nproc)" "$c_restart" <<'PY'
import csv, datetime, json, sys
sim_path, samples_path, seq_path = sys.argv[1:4]
devices, rate, metrics, outage = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
t_stop, t_restart, sim_status, final_count = float(sys.argv[8]), float(sys.argv[9]), int(sys.argv[10]), int(sys.argv[11])
cores, c_restart = sys.argv[12], int(sys.argv[13])
sim = json.load(open(sim_path))
incoming = rate * devices * (metrics + 1)

num = lambda s: float(s) if s not in ("", None) else None
rows = [(float(r["t"]), num(r["stored_points"]), num(r["spool_pending_bytes"]),
         num(r["spool_oldest_pending_seconds"])) for r in csv.DictReader(open(samples_path))]
before = [a for t, _, _, a in rows if t < t_stop and a is not None]
age_limit = max(2.0, 1.5 * max(before, default=0.0))
after = [(t, c, a) for t, c, _, a in rows if t > t_restart and c is not None]
achieved = sim["points"] / sim["elapsed_secs"] if sim["elapsed_secs"] else 0.0
sent_by = lambda t: min(sim["points"], achieved * t)
caught = next(((t, c, "count") for t, c, _ in after if c >= sent_by(t) - achieved), None)
if caught is None:
    caught = next(((t, c, "oldest pending age") for t, c, a in after
                   if a is not None and a <= age_limit), None)
drain, caught_by = None, "never"
if caught:
    t_b, c_b, how = caught
    drain = (c_b - c_restart) / (t_b - t_restart)
    caught_by = f"by {how} at t={t_b:.0f}s, {t_b - t_restart:.1f}s after the restart"
peak_mb = max((b for _, _, b, _ in rows if b is not None), default=0) / 1e6
peak_age = max((a for _, _, _, a in rows if a is not None), default=0)

stored_rows = distinct = gaps = 0
stored_devices = 0
for device, count, dist, top in csv.reader(open(seq_path)):
    stored_devices += 1
    stored_rows += int(count)
    distinct += int(dist)
    gaps += int(float(top)) + 1 - int(dist)
sent = sim["sent"]
lost = sent - distinct
dups = stored_rows - distinct
ratio = drain / incoming if drain else 0.0
print(f"sim: {sim['sent']} sent, {sim['acked']} acked, {sim['errors']} errors, exit status {sim_status}, "
      f"{achieved:,.0f} points/s achieved; stored at the restart {c_restart}; "
      f"points sent {sim['points']}, points stored {final_count}; seq stored for {stored_devices}/{devices} "
      f"devices, gaps inside devices {gaps}; backlog gone: {caught_by} (age limit {age_limit:.1f}s)", file=sys.stderr)
goal = drain is not None and ratio >= 2 and lost == 0 and dups == 0
print(f"# goal (drain ≥ 2× incoming, nothing lost or duplicated): {'met' if goal else 'MISSED'}")
print("# | date | cores | load | outage s | incoming points/s | drain points/s | ratio | peak spool MB | peak oldest age s | sent | stored distinct | lost | duplicates |")
load = f"{devices} devices × {rate:g} msg/s, {metrics + 1} points/msg, QoS 1"
drain_s = f"{drain:,.0f}" if drain is not None else "not drained"
today = datetime.datetime.now(datetime.timezone.utc).date()
print(f"| {today} | {cores} cores | {load} | {outage} | {incoming:,.0f} | {drain_s} | "
      f"{ratio:.2f}× | {peak_mb:.1f} | {peak_age:.1f} | {sent:,} | {distinct:,} | {lost:,} | {dups:,} |")
PY
