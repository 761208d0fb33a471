#!/usr/bin/env bash
# bench/lake.sh — `qanat lake merge` against DuckDB on the same daily full + delta merge.
#
# Generates (pyarrow) a snapshot of SNAPSHOT_ROWS rows (id Int64, name/note Utf8, qty Int64,
# amount Float64; ~100 B/row) and a change log of DELTA_ROWS rows (70 % updates of existing
# keys, 20 % inserts, 10 % deletes) in the lake layout, then times
#   qanat lake merge --delete-mode keep   (delta wins, deletes flagged _deleted)
#   DuckDB: dedupe the changes per key (row_number over _partition, _offset), FULL OUTER JOIN
#           the snapshot, COPY … TO Parquet (zstd, 1M-row groups)
# under /usr/bin/time -v, and prints seconds, rows/s, CPU seconds and peak RSS side by side.
# Both outputs' row counts are checked equal. Figures on a shared machine are lower bounds.
#
# Env: SNAPSHOT_ROWS (10000000), DELTA_ROWS (1000000), BENCH_TMPDIR (/tmp), BENCH_QANAT_BIN (skip build).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_TAG=lake
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

SNAPSHOT_ROWS=${SNAPSHOT_ROWS:-10000000}
DELTA_ROWS=${DELTA_ROWS:-1000000}

python3 -c 'import pyarrow' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pyarrow
python3 -c 'import numpy' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore numpy
python3 -c 'import duckdb' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore duckdb
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is needed"

# BENCH_QANAT_BIN, as in the other benches; QANAT_BIN works too.
QANAT_BIN=${BENCH_QANAT_BIN:-${QANAT_BIN:-}}
if [[ -z "${QANAT_BIN:-}" ]]; then
  build_release qanat
fi
start_tmp lake-bench
LAKE="$TMP/lake"

log "generating $SNAPSHOT_ROWS snapshot rows and $DELTA_ROWS changes"
python3 - "$LAKE" "$SNAPSHOT_ROWS" "$DELTA_ROWS" <<'PY'
import os, sys
import numpy as np
import pyarrow as pa, pyarrow.parquet as pq
lake, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(7)
def table(ids):
    k = len(ids)
    name = pa.array(np.char.add("customer-", (ids % 100003).astype(str)))
    note = pa.array(np.char.add("note ", rng.integers(0, 10**12, k).astype(str)))
    return {
        "id": pa.array(ids, pa.int64()),
        "name": name,
        "qty": pa.array(rng.integers(0, 1000, k), pa.int64()),
        "amount": pa.array(rng.random(k) * 1000, pa.float64()),
        "note": note,
    }
base_dir = f"{lake}/base/ds=20261128"
os.makedirs(base_dir)
chunk = 2_000_000
with pq.ParquetWriter(f"{base_dir}/part-00000.parquet",
                      pa.schema([("id", pa.int64()), ("name", pa.string()), ("qty", pa.int64()),
                                 ("amount", pa.float64()), ("note", pa.string())]),
                      compression="zstd") as w:
    for start in range(0, n, chunk):
        ids = np.arange(start, min(n, start + chunk), dtype=np.int64)
        w.write_table(pa.table(table(ids)))
upd, ins = int(m * 0.7), int(m * 0.2)
dele = m - upd - ins
ids = np.concatenate([rng.integers(0, n, upd), np.arange(n, n + ins), rng.integers(0, n, dele)])
ops = np.array(["u"] * upd + ["c"] * ins + ["d"] * dele)
order = rng.permutation(m)
ids, ops = ids[order], ops[order]
cols = table(ids)
t0 = 1_796_083_200_000  # 2026-11-29T00:00:00Z
ts = pa.array(t0 + np.arange(m, dtype=np.int64) * 80, pa.timestamp("ms", tz="UTC"))
cols.update({
    "_op": pa.array(ops), "_log_pos": pa.array(np.char.add("bin.000001:", np.arange(m).astype(str))),
    "_log_time": ts, "_commit_ts": ts, "_extract_time": ts,
    "_topic": pa.array(["cdc.bench.orders"] * m), "_partition": pa.array(np.zeros(m, np.int32)),
    "_offset": pa.array(np.arange(m, dtype=np.int64)),
})
t = pa.table(cols).replace_schema_metadata({"qanat.primary_key": "id"})
chg = f"{lake}/bench/orders_changes/ds=20261129"
os.makedirs(chg)
pq.write_table(t, f"{chg}/part-cdc.bench.orders-0-{0:020}-{m-1:020}.parquet", compression="zstd")
PY
du -sh "$LAKE/base" "$LAKE/bench/orders_changes" >&2

# measure NAME CMD...: runs CMD under GNU time; sets WALL, CPU, RSS_MB, LOAD.
measure() {
  local name=$1; shift
  LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
  /usr/bin/time -v -o "$TMP/$name.time" "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" ||
    { cat "$TMP/$name.err" >&2; die "$name failed"; }
  WALL=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$TMP/$name.time")
  CPU=$(awk -F': ' '/User time/ {u=$2} /System time/ {s=$2} END {printf "%.2f", u+s}' "$TMP/$name.time")
  RSS_MB=$(awk -F': ' '/Maximum resident/ {printf "%.0f", $2/1024}' "$TMP/$name.time")
}

rows_of() {
  python3 -c 'import sys,pyarrow.dataset as ds; print(ds.dataset(sys.argv[1], format="parquet").count_rows())' "$1"
}

log "qanat lake merge"
measure qanat "$QANAT_BIN" lake merge --root "$LAKE" --table bench.orders --ds 20261129 \
  --base "$LAKE/base/ds=20261128" --delete-mode keep
Q=("$WALL" "$CPU" "$RSS_MB" "$LOAD")
Q_ROWS=$(rows_of "$LAKE/bench/orders/ds=20261129")

log "duckdb"
cat >"$TMP/duck.py" <<PY
import duckdb
con = duckdb.connect()
con.execute("""
COPY (
  WITH d AS (
    SELECT * EXCLUDE (rn) FROM (
      SELECT *, row_number() OVER (PARTITION BY id ORDER BY _partition DESC, _offset DESC) AS rn
      FROM read_parquet('$LAKE/bench/orders_changes/ds=20261129/*.parquet')) WHERE rn = 1)
  SELECT COALESCE(d.id, b.id) AS id,
         CASE WHEN d.id IS NULL THEN b.name ELSE d.name END AS name,
         CASE WHEN d.id IS NULL THEN b.qty ELSE d.qty END AS qty,
         CASE WHEN d.id IS NULL THEN b.amount ELSE d.amount END AS amount,
         CASE WHEN d.id IS NULL THEN b.note ELSE d.note END AS note,
         d._op AS _op, COALESCE(d._op = 'd', false) AS _deleted, d._log_time, d._log_pos,
         d._partition, d._offset
  FROM read_parquet('$LAKE/base/ds=20261128/*.parquet') b FULL OUTER JOIN d ON b.id = d.id
) TO '$TMP/duck.parquet' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 1048576)
""")
PY
measure duckdb python3 "$TMP/duck.py"
D=("$WALL" "$CPU" "$RSS_MB" "$LOAD")
D_ROWS=$(rows_of "$TMP/duck.parquet")
[[ "$Q_ROWS" == "$D_ROWS" ]] || die "row counts differ: qanat $Q_ROWS, duckdb $D_ROWS"

echo
echo "daily merge: $SNAPSHOT_ROWS-row snapshot + $DELTA_ROWS changes -> $Q_ROWS rows ($(nproc) cores)"
printf '%-8s %9s %12s %8s %12s  %s\n' tool seconds rows/s cpu_s peak_rss_MB "load (start)"
for t in qanat duckdb; do
  if [[ $t == qanat ]]; then r=("${Q[@]}"); else r=("${D[@]}"); fi
  printf '%-8s %9.2f %12.0f %8s %12s  %s\n' "$t" "${r[0]}" \
    "$(awk -v n="$Q_ROWS" -v s="${r[0]}" 'BEGIN {print (s > 0 ? n / s : 0)}')" "${r[1]}" "${r[2]}" "${r[3]}"
done
echo "(shared machine: figures are noisy lower bounds)"

if [[ -x "$ROOT/bench/lake_land.sh" || -f "$ROOT/bench/lake_land.sh" ]]; then
  log "bench/lake_land.sh"
  bash "$ROOT/bench/lake_land.sh"
fi
