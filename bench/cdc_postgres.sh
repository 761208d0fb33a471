#!/usr/bin/env bash
# bench/cdc_postgres.sh — the PostgreSQL CDC source against pg_recvlogical (pgoutput), on a
# private PostgreSQL server (initdb + wal_level=logical on a free port; the machine's own
# server is not touched).
#
#   ROWS=500000 BATCH=1000 PACED_ROWS=100000 PACED_RATE=10000 bench/cdc_postgres.sh
#
# 1. Catch-up: ROWS rows are inserted (transactions of BATCH rows) while nobody reads; then
#    the source (crates/qanat-cdc/examples/pg_capture.rs: decode to events, acknowledge every
#    commit; no bus) and pg_recvlogical (raw pgoutput bytes to a file, the physical limit)
#    each read the same WAL from their own slot. Row events/s, CPU seconds, peak RSS.
# 2. Paced: PACED_ROWS rows at about PACED_RATE rows/s while the source streams live: lag
#    (arrival − commit time) p50/p99/max.
# Figures only; nothing is asserted.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH_TAG=cdc_postgres
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

ROWS=${ROWS:-500000}
BATCH=${BATCH:-1000}
PACED_ROWS=${PACED_ROWS:-100000}
PACED_RATE=${PACED_RATE:-10000}

PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[[ -x "$PGBIN/postgres" ]] || die "no PostgreSQL server binaries under /usr/lib/postgresql"

log "building (cargo build --release -p qanat-cdc --example pg_capture)"
(cd "$ROOT" && cargo build --release -p qanat-cdc --example pg_capture >&2)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
CAPTURE="$TARGET_DIR/release/examples/pg_capture"

start_tmp cdc_postgres
as_pg() { if [ "$(id -u)" -eq 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$TMP"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg "$PGBIN/initdb" -D "$TMP/data" -A trust -U postgres --no-sync -E UTF8 --locale=C >/dev/null
as_pg "$PGBIN/postgres" -D "$TMP/data" -p "$PORT" -k "$TMP" -c listen_addresses=127.0.0.1 \
  -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10 \
  -c shared_buffers=256MB -c max_wal_size=4GB >"$TMP/server.log" 2>&1 &
PG_PID=$!
PIDS+=("$PG_PID")
cleanup_extra() { kill -QUIT "$PG_PID" 2>/dev/null || true; }
for _ in $(seq 600); do
  "$PGBIN/pg_isready" -h 127.0.0.1 -p "$PORT" -q && break
  sleep 0.1
done
URL="postgres://postgres@127.0.0.1:$PORT/postgres"
sql() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -At "$@"; }

sql -c "CREATE TABLE bench (id bigint PRIMARY KEY, v int NOT NULL, note text)" \
    -c "CREATE PUBLICATION qanat_bench FOR TABLE bench" \
    -c "SELECT 1 FROM pg_create_logical_replication_slot('qanat_bench', 'pgoutput')" \
    -c "SELECT 1 FROM pg_create_logical_replication_slot('recv_bench', 'pgoutput')" >/dev/null

insert_rows() { # FIRST COUNT [PAUSE]: transactions of BATCH rows
  local first=$1 count=$2 pause=${3:-0} i
  for ((i = first; i < first + count; i += BATCH)); do
    echo "INSERT INTO bench SELECT g, g % 1000, md5(g::text) FROM generate_series($i, $((i + BATCH - 1))) g;"
    if [ "$pause" != 0 ]; then echo "SELECT pg_sleep($pause);"; fi
  done | sql >/dev/null
}

log "catch-up: inserting $ROWS rows"
insert_rows 1 "$ROWS"
END_LSN=$(sql -c "SELECT pg_current_wal_lsn()")

log "catch-up: qanat-cdc PostgreSQL source"
/usr/bin/time -f "%U %S %M" -o "$TMP/capture.time" \
  "$CAPTURE" "$URL" qanat_bench qanat_bench "$ROWS" >"$TMP/capture.out"
CAPTURE_JSON=$(tail -n1 "$TMP/capture.out")

log "catch-up: pg_recvlogical (pgoutput, raw)"
START=$(date +%s.%N)
/usr/bin/time -f "%U %S %M" -o "$TMP/recv.time" \
  "$PGBIN/pg_recvlogical" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres --slot recv_bench \
  --start --endpos "$END_LSN" -P pgoutput -o proto_version=1 -o publication_names=qanat_bench \
  -f "$TMP/recv.out" --no-loop
RECV_SECONDS=$(python3 -c "import time; print(round(time.time() - $START, 3))")

log "paced: $PACED_ROWS rows at about $PACED_RATE rows/s, streamed live"
sql -c "SELECT 1 FROM pg_create_logical_replication_slot('paced_bench', 'pgoutput')" >/dev/null
"$CAPTURE" "$URL" paced_bench qanat_bench "$PACED_ROWS" >"$TMP/paced.out" &
PACED_PID=$!
PIDS+=("$PACED_PID")
wait_line "$TMP/paced.out" "ready to " "$PACED_PID" >/dev/null || die "pg_capture did not start"
PAUSE=$(python3 -c "print($BATCH / $PACED_RATE)")
insert_rows $((ROWS + 1)) "$PACED_ROWS" "$PAUSE"
wait "$PACED_PID"
PACED_JSON=$(tail -n1 "$TMP/paced.out")

python3 - "$CAPTURE_JSON" "$(cat "$TMP/capture.time")" "$RECV_SECONDS" "$(cat "$TMP/recv.time")" \
  "$(stat -c %s "$TMP/recv.out")" "$PACED_JSON" "$ROWS" "$PACED_RATE" <<'EOF'
import json, sys
cap = json.loads(sys.argv[1]); cu, cs, crss = sys.argv[2].split()
recv_s = float(sys.argv[3]); ru, rs, rrss = sys.argv[4].split()
recv_bytes = int(sys.argv[5]); paced = json.loads(sys.argv[6]); rows = int(sys.argv[7])
print(f"{'reader':<34}{'rows/s':>12}{'CPU s/M rows':>15}{'peak RSS MiB':>14}")
print(f"{'qanat-cdc source (events, acks)':<34}{cap['rows_per_s']:>12.0f}"
      f"{(float(cu)+float(cs))/rows*1e6:>15.2f}{int(crss)/1024:>14.1f}")
print(f"{'pg_recvlogical pgoutput (raw)':<34}{rows/recv_s:>12.0f}"
      f"{(float(ru)+float(rs))/rows*1e6:>15.2f}{int(rrss)/1024:>14.1f}")
print(f"pg_recvlogical wrote {recv_bytes/2**20:.1f} MiB of pgoutput in {recv_s:.2f} s "
      f"(includes connection setup; the source's rate is timed from its first row)")
print(f"paced: {paced['rows']} rows at about {sys.argv[8]} rows/s: lag p50 {paced['lag_p50_ms']} ms, "
      f"p99 {paced['lag_p99_ms']} ms, max {paced['lag_max_ms']} ms "
      f"(arrival - commit time; ms resolution of the commit timestamp)")
EOF
