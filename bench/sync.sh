#!/usr/bin/env bash
# bench/sync.sh — `qanat sync` against the raw dump-and-load pipelines and pgloader, on the
# machine's MariaDB (127.0.0.1:3306, root) and PostgreSQL (127.0.0.1:5432, postgres).
#
# One table of BENCH_ROWS rows (default 10,000,000 × BENCH_SCALE) of mixed types, ~200 bytes
# a row, is generated in MariaDB; then, each into a fresh target:
#   MariaDB → PostgreSQL : qanat sync | pgloader (if installed) | mariadb --batch | psql COPY
#   PostgreSQL → MariaDB : qanat sync | psql COPY TO | LOAD DATA LOCAL INFILE
#   MariaDB → Parquet    : qanat sync
# Prints rows/s, MB/s (of the source's data length), CPU seconds and peak RSS of each.
#   BENCH_SCALE=0.1 bench/sync.sh      # 1M rows
#   SYNC_CHANNELS=4 (default); BENCH_QANAT_BIN=path skips the release build
#   pgloader comes from Debian's package of that name, installed here when missing
#   (BENCH_NO_INSTALL=1 skips that; its row is then left out).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_TAG=sync
source "$ROOT/bench/lib.sh"

ROWS=$(python3 -c "print(int(${BENCH_ROWS:-10000000} * ${BENCH_SCALE:-1}))")
CHANNELS=${SYNC_CHANNELS:-4}
DB=qanat_bench_sync
MY=(mariadb -h127.0.0.1 -P3306 -uroot --local-infile=1)
PG=(psql -h 127.0.0.1 -U postgres -X -q -v ON_ERROR_STOP=1)

if ! command -v pgloader >/dev/null 2>&1 && [ -z "${BENCH_NO_INSTALL:-}" ]; then
  log "installing pgloader (Debian package)"
  apt-get install -y -q pgloader >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q pgloader >/dev/null 2>&1; } ||
    log "pgloader could not be installed; its row is left out"
fi

if [ -n "${BENCH_QANAT_BIN:-}" ]; then
  QANAT_BIN=$BENCH_QANAT_BIN # another build, e.g. target/debug/qanat
else
  build_release qanat
fi
start_tmp qanat-sync-bench
cleanup_extra() {
  "${MY[@]}" -e "DROP DATABASE IF EXISTS $DB" 2>/dev/null
  "${PG[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
}

COLS_MY="id BIGINT PRIMARY KEY, customer INT, amount DECIMAL(12,2), ratio DOUBLE, status VARCHAR(16), created DATETIME(6), note VARCHAR(160)"
COLS_PG="id bigint PRIMARY KEY, customer integer, amount numeric(12,2), ratio double precision, status varchar(16), created timestamp(6), note varchar(160)"

log "generating $ROWS rows in MariaDB"
"${MY[@]}" -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
"${PG[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
"${PG[@]}" -d postgres -c "CREATE DATABASE $DB" >/dev/null
"${MY[@]}" $DB -e "CREATE TABLE src ($COLS_MY);
  INSERT INTO src SELECT seq, seq % 100000, (seq % 1000000) / 100, seq / 7.0,
    ELT(1 + seq % 4, 'new', 'paid', 'shipped', 'returned'),
    '2026-01-01' + INTERVAL seq SECOND, REPEAT(MD5(seq), 4) FROM seq_1_to_$ROWS;
  ANALYZE TABLE src;" >/dev/null
BYTES=$("${MY[@]}" -N $DB -e "SELECT data_length FROM information_schema.tables WHERE table_schema='$DB' AND table_name='src'")

RESULTS="$TMP/results"
: >"$RESULTS"
# measure NAME COMMAND...: run under /usr/bin/time, record wall s, CPU s, peak RSS. A failed
# qanat run ends the benchmark; a failed peer is reported in its row and the run goes on.
measure() {
  local name=$1
  shift
  log "$name"
  local start end
  start=$(date +%s.%N)
  /usr/bin/time -f "%U %S %M" -o "$TMP/time" "$@" >"$TMP/out" 2>"$TMP/err" || {
    tail -n 20 "$TMP/err" >&2
    [[ $name == qanat* ]] && die "$name failed"
    local why
    why=$(grep -m1 -iE "error|exhausted|fatal" "$TMP/err" | cut -c1-60)
    printf "%s\tfailed\t%s\n" "$name" "${why:-exit status non-zero}" >>"$RESULTS"
    return 0
  }
  end=$(date +%s.%N)
  read -r user sys rss <"$TMP/time"
  printf "%s\t%s\t%s\t%s\t%s\t%s\n" "$name" "$start" "$end" "$user" "$sys" "$rss" >>"$RESULTS"
}
pg_target() { "${PG[@]}" -d $DB -c "DROP TABLE IF EXISTS $1; CREATE TABLE $1 ($COLS_PG)" >/dev/null; }
my_target() { "${MY[@]}" $DB -e "DROP TABLE IF EXISTS $1; CREATE TABLE $1 ($COLS_MY)"; }

MYDSN="mysql://root@127.0.0.1:3306/$DB"
PGDSN="postgres://postgres@127.0.0.1:5432/$DB/public"

pg_target q_pg
measure "qanat mariadb→postgres" "$QANAT_BIN" sync copy --from "$MYDSN.src" --to "$PGDSN.q_pg" \
  --channels "$CHANNELS" --progress-secs 60
pg_target raw_pg
measure "mariadb --batch | psql COPY" bash -c \
  "${MY[*]} --batch --raw -N $DB -e 'SELECT * FROM src' | ${PG[*]} -d $DB -c \"COPY raw_pg FROM STDIN WITH (NULL 'NULL')\""
if command -v pgloader >/dev/null 2>&1; then
  "${PG[@]}" -d $DB -c "DROP TABLE IF EXISTS src" >/dev/null
  measure "pgloader mariadb→postgres" pgloader --quiet "mysql://root@127.0.0.1:3306/$DB" \
    "postgresql://postgres@127.0.0.1:5432/$DB"
fi

my_target q_my
measure "qanat postgres→mariadb" "$QANAT_BIN" sync copy --from "$PGDSN.q_pg" --to "$MYDSN.q_my" \
  --channels "$CHANNELS" --progress-secs 60
my_target raw_my
measure "psql COPY TO | LOAD DATA" bash -c \
  "${PG[*]} -d $DB -c 'COPY q_pg TO STDOUT' | ${MY[*]} $DB -e \"LOAD DATA LOCAL INFILE '/dev/stdin' INTO TABLE raw_my\""

measure "qanat mariadb→parquet" "$QANAT_BIN" sync copy --from "$MYDSN.src" \
  --to "parquet://$TMP/lake/src?ds=1" --channels "$CHANNELS" --progress-secs 60

printf "\n%s rows, %.0f MB (MariaDB data_length)\n" "$ROWS" "$(python3 -c "print($BYTES/1e6)")"
printf "%-30s %10s %12s %8s %8s %10s\n" run seconds rows/s MB/s "CPU s" "RSS MiB"
while IFS=$'\t' read -r name start end user sys rss; do
  if [[ $start == failed ]]; then
    printf "%-30s failed: %s\n" "$name" "$end"
    continue
  fi
  python3 - "$name" "$start" "$end" "$user" "$sys" "$rss" "$ROWS" "$BYTES" <<'PY'
import sys
name, start, end, user, sys_, rss, rows, size = sys.argv[1:]
secs = float(end) - float(start)
print(f"{name:<30} {secs:10.1f} {int(rows)/secs:12.0f} {int(size)/1e6/secs:8.1f} "
      f"{float(user)+float(sys_):8.1f} {int(rss)/1024:10.0f}")
PY
done <"$RESULTS"
