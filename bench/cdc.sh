#!/usr/bin/env bash
# bench/cdc.sh — change data capture from MariaDB, side by side with the physical limits.
#
# A private MariaDB (binlog ROW, full metadata) gets a sysbench insert-only load, then an
# oltp_write_only load; then `qanat cdc` reads that whole binlog from its first byte into a
# local `qanat broker` (its stored position is set to the binlog's start in the offsets topic)
# and is timed until its stored position reaches the binlog's end. In the same run:
# `mariadb-binlog --read-from-remote-server --raw` (the raw read of the same binlog) and
# `mariadb-binlog --read-from-remote-server -v` (the decode to pseudo-SQL).
#
# Also in the same run: python-mysql-replication (PyPI `mysql-replication`) counting the row
# events of the same binlog, and the end-to-end lag at a paced PACED_RATE row events/s (a
# TIMESTAMP(6) column set to NOW(6) at insert, compared with the time a consumer reads the
# record; the run starts once the consumer has read a warm-up row, see bench/cdc_lag.py).
#
# Then a second connector reads the four sbtest tables in an initial snapshot (timed until
# every row is read and a position past the snapshot is stored).
#
# Prints: row events captured, events/s, CPU seconds per million events and peak RSS of
# `qanat cdc`; the same for the snapshot (rows/s); MB/s of the raw read; events/s of the decode and of python-mysql-replication;
# lag p50/p99/max, and how much of it is commit -> producer (the envelope's ts_ms).
# BENCH_SCALE=0.1 makes a quick run (1M inserts at scale 1). BENCH_QANAT_BIN=path skips the build.
#
# Snapshot mode: CDC_SNAPSHOT_ROWS=10000000 bench/cdc.sh runs only the initial snapshot, of ONE
# table of that many rows (sysbench's schema from `sysbench oltp_insert prepare`, filled with
# sysbench-like values by INSERT ... SELECT from MariaDB's sequence engine, outside the binlog)
# and prints rows/s, CPU seconds per million rows and peak RSS of `qanat cdc`, the server's
# (mariadbd) and the broker's CPU seconds per million rows during it, and beside it the same
# table read by `mariadb --quick -e 'SELECT * FROM t' > /dev/null` (the server's read and the
# wire: the physical limit of a query-based snapshot). CDC_SNAPSHOT_CHUNK sets the connector's
# snapshot_chunk (default: the connector's default); CDC_BUFFER_POOL the server's InnoDB buffer
# pool (default 512M, 3G in snapshot mode, so that the table is read from memory).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_TAG=cdc
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

SCALE=${BENCH_SCALE:-1}
INSERTS=$(python3 -c "print(max(1000, int(1000000 * $SCALE)))")
WRITE_TX=$(python3 -c "print(max(100, int(100000 * $SCALE)))")

for cmd in mariadbd mariadb-install-db mariadb mariadb-binlog sysbench kcat; do
  command -v "$cmd" >/dev/null || die "$cmd not found (Debian packages mariadb-server, sysbench, kcat)"
done
PACED_RATE=${PACED_RATE:-10000}
SNAPSHOT_ROWS=${CDC_SNAPSHOT_ROWS:-}
if [ -n "$SNAPSHOT_ROWS" ]; then BUFFER_POOL=${CDC_BUFFER_POOL:-3G}; else BUFFER_POOL=${CDC_BUFFER_POOL:-512M}; fi
PACED_SECONDS=${PACED_SECONDS:-20}
# BENCH_QANAT_BIN, as in the other benches; QANAT_BIN works too.
QANAT_BIN=${BENCH_QANAT_BIN:-${QANAT_BIN:-}}
if [ -n "${QANAT_BIN:-}" ]; then
  log "using $QANAT_BIN"
else
  build_release qanat
fi
[ -n "$SNAPSHOT_ROWS" ] || python3 -c "import pymysqlreplication, pymysql, confluent_kafka" 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    mysql-replication pymysql confluent-kafka >&2 || log "pip install mysql-replication failed"
start_tmp qanat-cdc-bench

cleanup_extra() { [ -n "${DB_PID:-}" ] && stop_pids "$DB_PID"; }

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

log "starting a private MariaDB"
mariadb-install-db --no-defaults --datadir="$TMP/db" --auth-root-authentication-method=normal \
  --user=root --skip-test-db >"$TMP/install.log" 2>&1
DB_PORT=$(port)
mariadbd --no-defaults --datadir="$TMP/db" --socket="$TMP/db.sock" --port="$DB_PORT" \
  --bind-address=127.0.0.1 --log-bin="$TMP/db/binlog" --binlog-format=ROW \
  --binlog-row-metadata=FULL --server-id=1 --user=root --skip-name-resolve \
  --innodb-buffer-pool-size="$BUFFER_POOL" --innodb-flush-log-at-trx-commit=0 --sync-binlog=0 \
  --max-binlog-size=1G --pid-file="$TMP/db.pid" 2>"$TMP/db.log" &
DB_PID=$!
sql() { mariadb --no-defaults --socket="$TMP/db.sock" -uroot --batch --skip-column-names -e "$1"; }
for _ in $(seq 600); do sql "SELECT 1" >/dev/null 2>&1 && break; sleep 0.1; done
sql "CREATE USER 'cdc'@'%' IDENTIFIED BY 'cdc'; GRANT ALL ON *.* TO 'cdc'@'%'; CREATE DATABASE sbtest;"

TICKS=$(getconf CLK_TCK)
# cpu_s PID: utime + stime of a process so far, in seconds.
cpu_s() { awk -v t="$TICKS" '{printf "%.3f", ($14 + $15) / t}' "/proc/$1/stat"; }

start_broker() {
  log "starting the broker"
  "$QANAT_BIN" broker --data-dir "$TMP/broker" --listen 127.0.0.1:0 >"$TMP/broker.out" 2>"$TMP/broker.err" &
  BROKER_PID=$!
  PIDS+=("$BROKER_PID")
  BOOT=$(wait_line "$TMP/broker.out" "qanat broker listening on " "$BROKER_PID") || die "broker did not start"
}

# run_snapshot ROWS TABLES_REGEX: a connector named "snap" reads the matching tables in an
# initial snapshot; timed until every row is read and a position past the snapshot is stored
# (so every row read is acknowledged). Sets SNAP_DONE, SNAP_S, SNAP_CPU_S, SNAP_RSS_KB and the
# server's and the broker's CPU seconds over the same time (SNAP_DB_CPU_S, SNAP_BROKER_CPU_S).
run_snapshot() {
  local rows=$1 tables=$2 last="" db0 br0
  printf '%s\n' "bootstrap = \"$BOOT\"" '[[connector]]' 'name = "snap"' \
    "source = \"mysql://cdc:cdc@127.0.0.1:$DB_PORT\"" 'snapshot = "initial"' 'topic_prefix = "snap"' \
    "tables = ['$tables']" ${CDC_SNAPSHOT_CHUNK:+"snapshot_chunk = $CDC_SNAPSHOT_CHUNK"} \
    '[connector.producer]' '"linger.ms" = "20"' '"batch.num.messages" = "10000"' >"$TMP/snap.toml"
  db0=$(cpu_s "$DB_PID")
  br0=$(cpu_s "$BROKER_PID")
  t0=$(date +%s.%N)
  "$QANAT_BIN" cdc --config "$TMP/snap.toml" --metrics-listen 127.0.0.1:0 >"$TMP/snap.out" 2>"$TMP/snap.err" &
  SNAP_PID=$!
  PIDS+=("$SNAP_PID")
  SNAP_METRICS=$(wait_line "$TMP/snap.out" "qanat metrics listening on " "$SNAP_PID") ||
    die "the snapshot connector did not start: $(tail -5 "$TMP/snap.err")"
  SNAP_DONE=0
  for _ in $(seq 72000); do
    kill -0 "$SNAP_PID" 2>/dev/null || die "qanat cdc (snapshot) exited: $(tail -5 "$TMP/snap.err")"
    SNAP_DONE=$(curl -s "http://$SNAP_METRICS/metrics" |
      awk '/^qanat_cdc_snapshot_rows_total/ {s += $2} END {printf "%d", s}')
    # The offsets topic is looked at only once every row is read: each look starts kcat,
    # which costs CPU the connector would use on this small machine.
    if [ "$SNAP_DONE" -ge "$rows" ]; then
      last=$(kcat -C -b "$BOOT" -t qanat-cdc-offsets -o -1 -e -q -K '|' 2>/dev/null | tail -n1)
      [[ $last == snap\|* ]] && [[ $last != *'"snapshot"'* ]] && break
    fi
    sleep 0.1
  done
  [[ $last == snap\|* ]] && [[ $last != *'"snapshot"'* ]] || die "the snapshot did not finish ($SNAP_DONE of $rows rows)"
  # Up to when that position was stored, as for the stream.
  SNAP_STORED_MS=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1].split("|", 1)[1])["stored_ms"])' "$last")
  SNAP_S=$(python3 -c "print(max(0.001, $SNAP_STORED_MS / 1000 - $t0))")
  SNAP_CPU_S=$(cpu_s "$SNAP_PID")
  SNAP_RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$SNAP_PID/status")
  SNAP_DB_CPU_S=$(python3 -c "print($(cpu_s "$DB_PID") - $db0)")
  SNAP_BROKER_CPU_S=$(python3 -c "print($(cpu_s "$BROKER_PID") - $br0)")
  SNAP_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
  stop_pids "$SNAP_PID"
}

if [ -n "$SNAPSHOT_ROWS" ]; then
  log "snapshot mode: one sysbench table of $SNAPSHOT_ROWS rows"
  sysbench oltp_insert --db-driver=mysql --mysql-socket="$TMP/db.sock" --mysql-user=root \
    --mysql-db=sbtest --tables=1 --table-size=0 prepare >/dev/null
  # Filled outside the binlog (the snapshot reads the table, not the log), 1M rows a
  # statement; the secondary index is built afterwards, as sysbench's prepare does.
  sql "ALTER TABLE sbtest.sbtest1 DROP INDEX k_1"
  t0=$(date +%s.%N)
  for ((first = 1; first <= SNAPSHOT_ROWS; first += 1000000)); do
    last_id=$((first + 999999 > SNAPSHOT_ROWS ? SNAPSHOT_ROWS : first + 999999))
    sql "SET SESSION sql_log_bin = 0; INSERT INTO sbtest.sbtest1 (id, k, c, pad)
      SELECT seq, 1 + (seq * 7919) % $SNAPSHOT_ROWS,
        SUBSTRING(REPEAT(CONCAT(LPAD((seq * 104729) % 100000000000, 11, '0'), '-'), 11), 1, 119),
        SUBSTRING(REPEAT(CONCAT(LPAD((seq * 1299709) % 100000000000, 11, '0'), '-'), 5), 1, 59)
      FROM sbtest.seq_${first}_to_${last_id}"
  done
  sql "SET SESSION sql_log_bin = 0; ALTER TABLE sbtest.sbtest1 ADD INDEX k_1 (k)"
  log "filled in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
  start_broker
  log "peer: mariadb --quick -e 'SELECT * FROM sbtest.sbtest1' > /dev/null"
  db0=$(cpu_s "$DB_PID")
  t0=$(date +%s.%N)
  /usr/bin/time -f '%U %S' -o "$TMP/peer.time" mariadb --no-defaults --quick --batch \
    --skip-column-names -h127.0.0.1 -P"$DB_PORT" -ucdc -pcdc -e 'SELECT * FROM sbtest.sbtest1' >/dev/null
  PEER_S=$(python3 -c "print(max(0.001, $(date +%s.%N) - $t0))")
  PEER_DB_CPU_S=$(python3 -c "print($(cpu_s "$DB_PID") - $db0)")
  PEER_CPU_S=$(awk '{print $1 + $2}' "$TMP/peer.time")
  PEER_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
  log "qanat cdc: initial snapshot of sbtest.sbtest1 ($SNAPSHOT_ROWS rows)"
  run_snapshot "$SNAPSHOT_ROWS" 'sbtest\.sbtest1'
  python3 - "$SNAPSHOT_ROWS" "$SNAP_S" "$SNAP_CPU_S" "$SNAP_RSS_KB" "$SNAP_DB_CPU_S" \
    "$SNAP_BROKER_CPU_S" "$SNAP_LOAD" "$PEER_S" "$PEER_CPU_S" "$PEER_DB_CPU_S" "$PEER_LOAD" <<'PY'
import sys
rows = int(sys.argv[1])
s, cpu, rss, db, br = (float(x) for x in sys.argv[2:7])
load = sys.argv[7]
ps, pcpu, pdb = (float(x) for x in sys.argv[8:11])
pload = sys.argv[11]
m = rows / 1e6
print(f"{'reader':<44} {'rows':>10} {'rows/s':>9} {'CPU s/M':>8} {'srv CPU s/M':>11} "
      f"{'broker CPU s/M':>14} {'peak RSS':>9}  load")
print(f"{'qanat cdc initial snapshot (rows, acked)':<44} {rows:>10} {rows / s:>9.0f} {cpu / m:>8.2f} "
      f"{db / m:>11.2f} {br / m:>14.2f} {int(rss) / 1024:>7.1f}Mi  {load}")
print(f"{'mariadb --quick SELECT * > /dev/null':<44} {rows:>10} {rows / ps:>9.0f} {pcpu / m:>8.2f} "
      f"{pdb / m:>11.2f} {'':>14} {'':>9}  {pload}")
PY
  exit 0
fi

SB=(--db-driver=mysql --mysql-socket="$TMP/db.sock" --mysql-user=root --mysql-db=sbtest --tables=4)
log "sysbench oltp_insert: $INSERTS inserts"
sysbench oltp_insert "${SB[@]}" --table-size=0 prepare >/dev/null
sysbench oltp_insert "${SB[@]}" --threads=4 --events="$INSERTS" --time=0 run >"$TMP/sb_insert.log"
log "sysbench oltp_write_only: $WRITE_TX transactions"
sysbench oltp_write_only "${SB[@]}" --threads=4 --events="$WRITE_TX" --time=0 run >"$TMP/sb_write.log"
read -r END_FILE END_POS < <(sql "SHOW MASTER STATUS" | cut -f1,2)
FIRST_FILE=$(sql "SHOW BINARY LOGS" | head -n1 | cut -f1)
BINLOG_BYTES=$(sql "SHOW BINARY LOGS" | awk '{s += $2} END {print s}')
log "binlog: $FIRST_FILE .. $END_FILE:$END_POS, $BINLOG_BYTES bytes"

log "raw read: mariadb-binlog --read-from-remote-server --raw"
mkdir -p "$TMP/raw"
t0=$(date +%s.%N)
mariadb-binlog --no-defaults --read-from-remote-server --raw --to-last-log -h127.0.0.1 -P"$DB_PORT" \
  -ucdc -pcdc --result-file="$TMP/raw/" "$FIRST_FILE"
RAW_S=$(python3 -c "import time; print(max(0.001, $(date +%s.%N) - $t0))")
rm -rf "$TMP/raw"
log "decode: mariadb-binlog --read-from-remote-server -v"
t0=$(date +%s.%N)
DECODED_ROWS=$(mariadb-binlog --no-defaults --read-from-remote-server -v --to-last-log -h127.0.0.1 \
  -P"$DB_PORT" -ucdc -pcdc "$FIRST_FILE" | grep -c '^### \(INSERT\|UPDATE\|DELETE\)' || true)
DEC_S=$(python3 -c "import time; print(max(0.001, $(date +%s.%N) - $t0))")

log "python-mysql-replication: the same binlog, row events counted"
# Bounded: on this workload it has been seen to reconnect in a loop (pymysql.OperationalError,
# "Re-request the connection") without reaching the end.
PY_ROWS=0 PY_S=0
PY_LIMIT=${PYREPL_TIMEOUT:-$(python3 -c "print(int(max(120, 30 * $DEC_S)))")}
if PYREPL=$(timeout "$PY_LIMIT" python3 "$ROOT/bench/cdc_pyrepl.py" "$DB_PORT" "$FIRST_FILE" 2>"$TMP/pyrepl.err"); then
  read -r PY_ROWS PY_S <<<"$PYREPL"
else
  log "python-mysql-replication did not finish within ${PY_LIMIT}s; reconnects after" \
    "pymysql.OperationalError: $(grep -c OperationalError "$TMP/pyrepl.err" || true);" \
    "last error: $(grep -v '^[[:space:]]*$' "$TMP/pyrepl.err" | tail -1 | tr -s ' ')"
fi

start_broker

# Start the connector at the binlog's first byte: its stored position is what it resumes from.
echo "bench|{\"position\":{\"file\":\"$FIRST_FILE\",\"pos\":4},\"stored_ms\":0,\"commit_ts_ms\":0}" |
  kcat -P -b "$BOOT" -t qanat-cdc-offsets -K '|'
cat >"$TMP/cdc.toml" <<EOF
bootstrap = "$BOOT"
[[connector]]
name = "bench"
source = "mysql://cdc:cdc@127.0.0.1:$DB_PORT"
snapshot = "never"
tables = ['sbtest\..*']
[connector.producer]
"linger.ms" = "20"
"batch.num.messages" = "10000"
EOF
log "qanat cdc: the whole binlog into the bus"
t0=$(date +%s.%N)
"$QANAT_BIN" cdc --config "$TMP/cdc.toml" --metrics-listen 127.0.0.1:0 >"$TMP/cdc.out" 2>"$TMP/cdc.err" &
CDC_PID=$!
PIDS+=("$CDC_PID")
METRICS=$(wait_line "$TMP/cdc.out" "qanat metrics listening on " "$CDC_PID") || die "cdc did not start: $(tail -5 "$TMP/cdc.err")"
# The time taken is up to when the end position was stored (the record's stored_ms), not up to
# when this loop sees it: each look starts kcat and python, which takes a second under load.
pos=""
for _ in $(seq 36000); do
  kill -0 "$CDC_PID" 2>/dev/null || die "qanat cdc exited: $(tail -5 "$TMP/cdc.err")"
  read -r pos_file pos_at stored_ms < <(kcat -C -b "$BOOT" -t qanat-cdc-offsets -o -1 -e -q 2>/dev/null |
    tail -n1 | python3 -c 'import json,sys; r=json.loads(sys.stdin.read() or "{}"); p=r.get("position",{}); print(p.get("file","-"), p.get("pos","-"), r.get("stored_ms",0))')
  pos="$pos_file $pos_at"
  [ "$pos" = "$END_FILE $END_POS" ] && break
  sleep 0.1
done
[ "$pos" = "$END_FILE $END_POS" ] || die "qanat cdc did not reach $END_FILE:$END_POS (at $pos)"
CDC_S=$(python3 -c "print(max(0.001, $stored_ms / 1000 - $t0))")
EVENTS=$(curl -s "http://$METRICS/metrics" | awk '/^qanat_cdc_events_total/ {s += $2} END {printf "%d", s}')
read -r UT ST < <(awk '{print $14, $15}' "/proc/$CDC_PID/stat")
CPU_S=$(python3 -c "print(($UT + $ST) / $TICKS)")
RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$CDC_PID/status")
stop_pids "$CDC_PID"

SNAP_ROWS=$(for t in 1 2 3 4; do sql "SELECT COUNT(*) FROM sbtest.sbtest$t"; done | awk '{s += $1} END {print s}')
log "qanat cdc: initial snapshot of the sbtest tables ($SNAP_ROWS rows)"
run_snapshot "$SNAP_ROWS" 'sbtest\..*'

log "paced: $PACED_RATE row events/s for ${PACED_SECONDS}s, end-to-end lag"
sql "CREATE DATABASE lag; CREATE TABLE lag.t (id BIGINT AUTO_INCREMENT PRIMARY KEY,
  ts TIMESTAMP(6) NOT NULL, pad CHAR(60) NOT NULL)"
printf '%s\n' "bootstrap = \"$BOOT\"" '[[connector]]' 'name = "lag"' \
  "source = \"mysql://cdc:cdc@127.0.0.1:$DB_PORT\"" 'snapshot = "never"' \
  "tables = ['lag\\..*']" >"$TMP/lag.toml"
"$QANAT_BIN" cdc --config "$TMP/lag.toml" >"$TMP/lag.out" 2>"$TMP/lag.err" &
LAG_PID=$!
PIDS+=("$LAG_PID")
wait_line "$TMP/lag.out" "qanat cdc connector " "$LAG_PID" >/dev/null ||
  die "the lag connector did not start: $(tail -5 "$TMP/lag.err")"
LAG="0 0 nan nan nan nan nan"
LAG=$(python3 "$ROOT/bench/cdc_lag.py" "$BOOT" "$DB_PORT" "$PACED_RATE" "$PACED_SECONDS" \
  2>"$TMP/lag_py.err") || log "paced run failed: $(tail -3 "$TMP/lag_py.err" | tr '\n' ' ')"
read -r LAG_N LAG_RATE LAG_P50 LAG_P99 LAG_MAX PROD_P50 PROD_P99 <<<"$LAG"
stop_pids "$LAG_PID"

python3 - "$EVENTS" "$CDC_S" "$CPU_S" "$RSS_KB" "$BINLOG_BYTES" "$RAW_S" "$DECODED_ROWS" "$DEC_S" \
  "$PY_ROWS" "$PY_S" "$LAG_N" "$LAG_RATE" "$LAG_P50" "$LAG_P99" "$LAG_MAX" \
  "$SNAP_DONE" "$SNAP_S" "$SNAP_CPU_S" "$SNAP_RSS_KB" "$PROD_P50" "$PROD_P99" <<'PY'
import sys
events, cdc_s, cpu_s, rss_kb, binlog, raw_s, dec_rows, dec_s = sys.argv[1:9]
py_rows, py_s, lag_n, lag_rate, p50, p99, pmax = sys.argv[9:16]
snap_rows, snap_s = int(sys.argv[16]), float(sys.argv[17])
snap_cpu, snap_rss = float(sys.argv[18]), int(sys.argv[19])
prod_p50, prod_p99 = float(sys.argv[20]), float(sys.argv[21])
events, cdc_s, cpu_s, binlog = int(events), float(cdc_s), float(cpu_s), int(binlog)
print(f"{'reader':<44} {'row events':>12} {'events/s':>12} {'MB/s':>9} {'CPU s/M ev':>11} {'peak RSS':>10}")
print(f"{'qanat cdc (binlog -> bus, acked, stored)':<44} {events:>12} {events / cdc_s:>12.0f} "
      f"{binlog / cdc_s / 1e6:>9.1f} {cpu_s / max(events, 1) * 1e6:>11.2f} {int(rss_kb) / 1024:>8.1f}Mi")
print(f"{'mariadb-binlog -v (decode to pseudo-SQL)':<44} {int(dec_rows):>12} "
      f"{int(dec_rows) / float(dec_s):>12.0f} {binlog / float(dec_s) / 1e6:>9.1f} {'':>11} {'':>10}")
print(f"{'mariadb-binlog --raw (read only)':<44} {'':>12} {'':>12} {binlog / float(raw_s) / 1e6:>9.1f} {'':>11} {'':>10}")
if int(py_rows):
    print(f"{'python-mysql-replication (decode, count)':<44} {int(py_rows):>12} "
          f"{int(py_rows) / float(py_s):>12.0f} {binlog / float(py_s) / 1e6:>9.1f} {'':>11} {'':>10}")
else:
    print(f"{'python-mysql-replication':<44} failed (its error is logged above)")
print(f"{'qanat cdc initial snapshot (rows, acked)':<44} {snap_rows:>12} {snap_rows / snap_s:>12.0f} "
      f"{'':>9} {snap_cpu / max(snap_rows, 1) * 1e6:>11.2f} {snap_rss / 1024:>8.1f}Mi")
print(f"paced lag (NOW(6) at insert -> record read): {lag_n} events at {float(lag_rate):.0f}/s: "
      f"p50 {float(p50):.1f} ms, p99 {float(p99):.1f} ms, max {float(pmax):.1f} ms "
      f"(of which commit -> producer: p50 {prod_p50:.1f} ms, p99 {prod_p99:.1f} ms)")
PY
