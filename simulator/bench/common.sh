# Shared set-up of the benchmark scripts; sourced by them, not run.
#
# Builds the release binaries, makes a work directory (removed on exit), picks
# free ports, and starts and stops `sluice serve --allow-anonymous` (rate
# limit off) with its managed PostgreSQL under "$work/data". Every server a
# script starts reuses that PostgreSQL.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
cargo build --release -q -p sluice -p sluice-simulator
bin="${CARGO_TARGET_DIR:-$root/target}/release"

# KEEP=1 leaves the work directory (and its database) behind; WORK=DIR
# reuses one left behind.
work=${WORK:-$(mktemp -d /tmp/sluice-bench-XXXXXX)}
chmod 755 "$work" # the managed PostgreSQL runs as another user when we are root
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(free_port); ws=$(free_port); grpc=$(free_port); metrics=$(free_port)

sluice_pid=""
# start_sluice [NAME=VALUE ...]: starts a server with that extra environment
# and waits until it is ready.
start_sluice() {
  # Counted from the log as it is now (a reused work directory has older lines).
  sluice_starts=$(( $(grep -c "sluice is ready" "$work/sluice.log" 2>/dev/null || true) + 1 ))
  env SLUICE_BROKER__MAX_PUBLISH_RATE=0 "$@" \
    "$bin/sluice" serve --allow-anonymous --data-dir "$work/data" --rules "$work/rules" \
    --mqtt-listen "127.0.0.1:$mqtt" --ws-listen "127.0.0.1:$ws" \
    --grpc-listen "127.0.0.1:$grpc" --metrics-listen "127.0.0.1:$metrics" \
    >>"$work/sluice.log" 2>&1 &
  sluice_pid=$!
  for _ in $(seq 600); do
    [ "$(grep -c "sluice is ready" "$work/sluice.log")" -ge "$sluice_starts" ] && return 0
    sleep 0.1
  done
  cat "$work/sluice.log"
  exit 1
}
stop_sluice() {
  if [ -n "$sluice_pid" ]; then
    kill -TERM "$sluice_pid" 2>/dev/null || true
    wait "$sluice_pid" 2>/dev/null || true
  fi
  sluice_pid=""
}
if [ "${KEEP:-0}" = 1 ] || [ -n "${WORK:-}" ]; then
  trap 'stop_sluice; echo "kept $work" >&2' EXIT
else
  trap 'stop_sluice; rm -rf "$work"' EXIT
fi

# managed_pg: once a server is ready, the managed PostgreSQL's port
# ($pgport), password (exported as PGPASSWORD) and URL ($database_url).
managed_pg() {
  PGPASSWORD=$(cat "$work/data/pg-password")
  export PGPASSWORD
  pgport=$(sed -n 4p "$work/data/pg/postmaster.pid")
  # Through the Unix socket, as Sluice connects (on TCP every COPY waits
  # for a delayed ACK: see ingest/src/managed.rs, database_url).
  if [ -S "$work/data/pg/.s.PGSQL.$pgport" ]; then
    database_url="postgres://postgres:$PGPASSWORD@localhost:$pgport/sluice?host=$work/data/pg"
  else
    database_url="postgres://postgres:$PGPASSWORD@127.0.0.1:$pgport/sluice"
  fi
}
# psql_ ARGS...: psql on the managed database, unaligned, tuples only.
psql_() { psql -X -q -t -A -h 127.0.0.1 -p "$pgport" -U postgres -d sluice "$@"; }
# prom_samples REGEX: the server's Prometheus samples whose name matches REGEX.
prom_samples() { curl -s "127.0.0.1:$metrics/metrics" | awk -v re="$1" '$1 !~ /^#/ && $1 ~ re'; }
