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
# Prints: events, events/s, MB/s of record values, CPU seconds (and per million events),
# peak RSS of the lander (both from /usr/bin/time, all threads), files and bytes landed, how
# long the group join took; and the consume-only rate. The broker's groups start their first
# rebalance at once (initial_rebalance_delay_ms = 0), as for a lone lander.
#
#   bench/lake_land.sh [N]     N events, e.g. 10M (the default), 500k or 2000000
#
# Without N: 10M × BENCH_SCALE (default 1). BENCH_QANAT_BIN=path measures that binary
# instead of building the release one.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_TAG=lake-land
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

SCALE=${BENCH_SCALE:-1}
if [ -n "${1:-}" ]; then
  EVENTS=$(python3 - "$1" <<'PY'
import sys
t = sys.argv[1].strip().lower()
mult = {"k": 1000, "m": 1000000}.get(t[-1:], 1)
try:
    n = int(float(t[:-1] if t[-1:] in ("k", "m") else t) * mult)
except ValueError:
    n = 0
if n < 1:
    sys.exit(f"event count {sys.argv[1]!r}: expected a positive number such as 10M")
print(n)
PY
) || die "usage: $0 [EVENTS, e.g. 10M]"
else
  EVENTS=$(python3 -c "print(max(1000, int(10000000 * $SCALE)))")
fi
[ -x /usr/bin/time ] || die "/usr/bin/time not found (Debian package time)"
PARTITIONS=4
command -v kcat >/dev/null || die "kcat not found (Debian package kcat)"
if [ -n "${BENCH_QANAT_BIN:-}" ]; then
  QANAT_BIN=$BENCH_QANAT_BIN # measure another build (e.g. a debug one) without building
else
  build_release qanat
fi
start_tmp qanat-lake-land-bench

log "starting the broker"
# One consumer joins the lander's group: Kafka's default 3 s wait of a new group's first
# rebalance for more members would only add 3 s of idle to every `--once` run measured.
printf '[groups]\ninitial_rebalance_delay_ms = 0\n' >"$TMP/broker.toml"
"$QANAT_BIN" broker --config "$TMP/broker.toml" --data-dir "$TMP/broker" --listen 127.0.0.1:0 \
  >"$TMP/broker.out" 2>"$TMP/broker.err" &
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
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
t0=$(date +%s.%N)
/usr/bin/time -f '%U %S %M' -o "$TMP/land.time" \
  "$QANAT_BIN" lake land --bootstrap "$BOOT" --topic "$TOPIC" --table bench.orders \
  --root "$TMP/lake" --once >"$TMP/land.out" 2>"$TMP/land.err" ||
  die "lake land failed: $(tail -5 "$TMP/land.err")"
LAND_S=$(python3 -c "print(max(0.001, $(date +%s.%N) - $t0))")
# Start to the group's assignment (the lander's log line), within the time above.
JOIN_S=$(python3 - "$t0" "$TMP/land.err" <<'PY'
import datetime, sys
t0 = float(sys.argv[1])
for line in open(sys.argv[2], errors="replace"):
    if "partition assigned" in line:
        stamp = line.split()[0].rstrip("Z")[:26]
        at = datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.timezone.utc)
        print(f"{at.timestamp() - t0:.2f}")
        break
else:
    print("?")
PY
)
read -r UT ST RSS_KB < <(tail -1 "$TMP/land.time")
CPU_S=$(python3 -c "print($UT + $ST)")
FILES=$(find "$TMP/lake" -name '*.parquet' | wc -l)
LAKE_BYTES=$(find "$TMP/lake" -name '*.parquet' -printf '%s\n' | awk '{s += $1} END {print s}')
ROWS=$(python3 -c "
import pyarrow.dataset as ds
print(ds.dataset('$TMP/lake/bench/orders_changes', format='parquet').count_rows())" 2>/dev/null || echo "?")
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$EVENTS" "$LAND_S" "$CPU_S" "$RSS_KB" "$VALUE_BYTES" "$KCAT_S" "$FILES" "$LAKE_BYTES" "$ROWS" "$LOAD_BEFORE" "$LOAD" "$QANAT_BIN" "$JOIN_S" <<'PY'
import sys
ev, land_s, cpu_s, rss_kb, vbytes, kcat_s, files, lbytes, rows, load0, load, qbin, join_s = sys.argv[1:]
ev, land_s, cpu_s, vbytes, kcat_s = int(ev), float(land_s), float(cpu_s), int(vbytes), float(kcat_s)
print(f"binary {qbin}")
print(f"{'run':<28} {'events':>10} {'events/s':>10} {'MB/s':>8} {'CPU s':>8} {'CPU s/M ev':>10} {'peak RSS':>10}")
print(f"{'qanat lake land --once':<28} {ev:>10} {ev / land_s:>10.0f} {vbytes / land_s / 1e6:>8.1f} {cpu_s:>8.1f} {cpu_s / (ev / 1e6):>10.2f} {int(rss_kb) / 1024:>8.1f}Mi")
print(f"{'kcat -C -e (consume only)':<28} {ev:>10} {ev / kcat_s:>10.0f} {vbytes / kcat_s / 1e6:>8.1f}")
print(f"group joined {join_s} s after start (within the landing time)")
print(f"landed rows {rows} in {files} files, {int(lbytes or 0) / 1e6:.1f} MB of Parquet ({vbytes / 1e6:.1f} MB of JSON values)")
print(f"load average {load0} before landing, {load} after (shared machine: rates are lower bounds)")
PY
