#!/usr/bin/env bash
# bench/lake_land.sh — `qanat lake land --once` of CDC envelopes, side by side with a plain
# consume of the same topic.
#
# A release `qanat broker` gets N Debezium-style change events (keyed by {"id":…}, 4
# partitions, produced with kcat from a generated file), then `qanat lake land --once`
# lands them into a fresh lake root (zstd Parquet, daily change-log partitions) and is timed
# from start to exit. In the same run `kcat -C -e` reads the whole topic to /dev/null: the
# cost of only fetching the records.
#
# Prints: events, events/s, MB/s of record values, CPU seconds, peak RSS of the lander,
# files and bytes landed; and the consume-only rate. N = 10M × BENCH_SCALE (default 1).
# BENCH_QANAT_BIN=path measures that binary instead of building the release one.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_TAG=lake-land
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

SCALE=${BENCH_SCALE:-1}
EVENTS=$(python3 -c "print(max(1000, int(10000000 * $SCALE)))")
PARTITIONS=4
command -v kcat >/dev/null || die "kcat not found (Debian package kcat)"
if [ -n "${BENCH_QANAT_BIN:-}" ]; then
  QANAT_BIN=$BENCH_QANAT_BIN # measure another build (e.g. a debug one) without building
else
  build_release qanat
fi
start_tmp qanat-lake-land-bench

log "starting the broker"
"$QANAT_BIN" broker --data-dir "$TMP/broker" --listen 127.0.0.1:0 >"$TMP/broker.out" 2>"$TMP/broker.err" &
PIDS+=($!)
BOOT=$(wait_line "$TMP/broker.out" "qanat broker listening on " "$!") || die "broker did not start"
TOPIC=cdc.bench.orders
"$QANAT_BIN" topics create "$TOPIC" --partitions "$PARTITIONS" --bootstrap "$BOOT" >/dev/null

log "producing $EVENTS change events"
python3 - "$EVENTS" <<'PY' | kcat -P -b "$BOOT" -t "$TOPIC" -K $'\t' -X linger.ms=50 -X batch.num.messages=10000 -X queue.buffering.max.messages=1000000
import sys
n = int(sys.argv[1])
out = sys.stdout
base = 1795910400000
buf = []
for i in range(n):
    op = "c" if i % 3 else "u"
    buf.append(
        '{"id":%d}\t{"before":null,"after":{"id":%d,"customer":%d,"status":"%s","amount":"%d.%02d",'
        '"note":"order %d of the benchmark","created_at":"2026-11-29T10:00:00Z"},'
        '"source":{"version":"0.1.0","connector":"mysql","name":"bench","ts_ms":%d,"snapshot":"false",'
        '"db":"bench","table":"orders","server_id":1,"file":"binlog.000001","pos":%d,"row":0},'
        '"op":"%s","ts_ms":%d,"transaction":null}\n'
        % (i % 1000000, i % 1000000, i % 5000, "paid" if i % 2 else "new", i % 1000, i % 100,
           i, base + i, 4 + i * 300, op, base + i + 5)
    )
    if len(buf) == 10000:
        out.write("".join(buf))
        buf = []
out.write("".join(buf))
PY

log "consume only: kcat -C -e"
t0=$(date +%s.%N)
kcat -C -b "$BOOT" -t "$TOPIC" -e -q -o beginning -f '%s\n' >"$TMP/values.txt"
KCAT_S=$(python3 -c "print(max(0.001, $(date +%s.%N) - $t0))")
VALUE_BYTES=$(wc -c <"$TMP/values.txt")
rm -f "$TMP/values.txt"

log "landing: qanat lake land --once"
TICKS=$(getconf CLK_TCK)
t0=$(date +%s.%N)
"$QANAT_BIN" lake land --bootstrap "$BOOT" --topic "$TOPIC" --table bench.orders \
  --root "$TMP/lake" --once >"$TMP/land.out" 2>"$TMP/land.err" &
LAND_PID=$!
RSS_KB=0
UT=0
ST=0
while kill -0 "$LAND_PID" 2>/dev/null; do
  if [ -r "/proc/$LAND_PID/stat" ]; then
    read -r UT ST < <(awk '{print $14, $15}' "/proc/$LAND_PID/stat" 2>/dev/null || echo "$UT $ST") || true
    R=$(awk '/VmHWM/ {print $2}' "/proc/$LAND_PID/status" 2>/dev/null || echo 0)
    [ -n "$R" ] && [ "$R" -gt "$RSS_KB" ] && RSS_KB=$R
  fi
  sleep 0.2
done
wait "$LAND_PID" || die "lake land failed: $(tail -5 "$TMP/land.err")"
LAND_S=$(python3 -c "print(max(0.001, $(date +%s.%N) - $t0))")
CPU_S=$(python3 -c "print(($UT + $ST) / $TICKS)")
FILES=$(find "$TMP/lake" -name '*.parquet' | wc -l)
LAKE_BYTES=$(find "$TMP/lake" -name '*.parquet' -printf '%s\n' | awk '{s += $1} END {print s}')
ROWS=$(python3 -c "
import pyarrow.dataset as ds
print(ds.dataset('$TMP/lake/bench/orders_changes', format='parquet').count_rows())" 2>/dev/null || echo "?")
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$EVENTS" "$LAND_S" "$CPU_S" "$RSS_KB" "$VALUE_BYTES" "$KCAT_S" "$FILES" "$LAKE_BYTES" "$ROWS" "$LOAD" <<'PY'
import sys
ev, land_s, cpu_s, rss_kb, vbytes, kcat_s, files, lbytes, rows, load = sys.argv[1:]
ev, land_s, cpu_s, vbytes, kcat_s = int(ev), float(land_s), float(cpu_s), int(vbytes), float(kcat_s)
print(f"{'run':<34} {'events':>10} {'events/s':>10} {'MB/s':>8} {'CPU s':>8} {'peak RSS':>10}")
print(f"{'qanat lake land --once':<34} {ev:>10} {ev / land_s:>10.0f} {vbytes / land_s / 1e6:>8.1f} {cpu_s:>8.1f} {int(rss_kb) / 1024:>8.1f}Mi")
print(f"{'kcat -C -e (consume only)':<34} {ev:>10} {ev / kcat_s:>10.0f} {vbytes / kcat_s / 1e6:>8.1f} {'':>8} {'':>10}")
print(f"landed rows {rows} in {files} files, {int(lbytes or 0) / 1e6:.1f} MB of Parquet ({vbytes / 1e6:.1f} MB of JSON values)")
print(f"load average {load} (shared machine: figures are lower bounds)")
PY
