#!/usr/bin/env bash
# bench/latency.sh — produce latency of the Qanat broker at fixed rates, per fsync setting,
# with the kernel stacks of broker threads seen blocked (D state) during each run.
#
# What it does, for each fsync setting in LAT_FSYNC and each rate in LAT_RATES:
#   starts a fresh broker (release build) with `[storage] fsync = <setting>`, runs
#   `qanat-bench kafka-produce` (1 KiB records, acks=1, linger.ms=1, paced at the rate) for
#   LAT_SECS seconds, and samples /proc/<broker>/task/*/stack every 2 ms for threads in D
#   state (needs root to read kernel stacks; without it the column says so).
# Output: one markdown table on stdout (p50/p99/p99.9/max, D-state samples and the most
# frequent blocking function); progress on stderr. All traffic goes to 127.0.0.1.
#
# Env:  LAT_RATES  (default "65000 122000 244000") records/s
#       LAT_FSYNC  (default "1000 3600000") fsync settings; 3600000 is periodic fsync pushed out
#       LAT_SECS   (default 10) seconds per run
#       BENCH_TMPDIR (default /tmp) parent of the temp dir (data dirs live there: use the disk
#                  under test, not a tmpfs)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_TAG=latency
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RATES=${LAT_RATES:-65000 122000 244000}
FSYNCS=${LAT_FSYNC:-1000 3600000}
SECS=${LAT_SECS:-10}

start_tmp qanat-latency
build_release qanat qanat-bench

echo "| fsync | rate rec/s | p50 ms | p99 ms | p99.9 ms | max ms | D-state samples | most frequent blocked in |"
echo "|---|---|---|---|---|---|---|---|"
for fsync in $FSYNCS; do
  for rate in $RATES; do
    run="$TMP/run-$fsync-$rate"
    mkdir -p "$run"
    printf '[storage]\nfsync = %s\n' "$fsync" >"$run/qanat.toml"
    "$QANAT_BIN" broker --data-dir "$run/data" --listen 127.0.0.1:0 --config "$run/qanat.toml" \
      >"$run/out" 2>"$run/err" &
    broker=$!
    PIDS+=("$broker")
    addr=$(wait_line "$run/out" "qanat broker listening on " "$broker") || die "broker did not start"
    (
      while kill -0 "$broker" 2>/dev/null; do
        for t in /proc/"$broker"/task/*; do
          if [ "$(awk '{print $3}' "$t/stat" 2>/dev/null)" = D ]; then
            echo "== sample"
            head -3 "$t/stack" 2>/dev/null || echo "(no stack: not root)"
          fi
        done
        sleep 0.002
      done
    ) >"$run/dstacks" 2>/dev/null &
    sampler=$!
    log "fsync=$fsync rate=$rate"
    timeout $((SECS + 60)) "$BENCH_BIN" kafka-produce --bootstrap "$addr" --topic lat \
      --record-size 1024 --count 1000000000 --acks 1 --linger-ms 1 --rate "$rate" \
      --max-secs "$SECS" >"$run/bench.json" 2>"$run/bench.err" || log "client failed: $(tail -2 "$run/bench.err")"
    stop_pids "$broker"
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    samples=$(grep -c '^== sample' "$run/dstacks" || true)
    top=$(grep -v '^== sample' "$run/dstacks" | sed 's/^\[<[^>]*>\] //; s/+0x.*//' | sort | uniq -c |
      sort -rn | head -1 | awk '{print $2}')
    jq -r --arg f "$fsync" --arg r "$rate" --arg n "$samples" --arg t "${top:--}" \
      '"| \($f) | \($r) | \(.lat_p50_ms) | \(.lat_p99_ms) | \(.lat_p999_ms) | \(.lat_max_ms) | \($n) | \($t) |"' \
      "$run/bench.json" || echo "| $fsync | $rate | failed | | | | | |"
    rm -rf "$run/data"
  done
done
echo
echo "Machine: $(nproc) cores; load average at end $(cut -d' ' -f1-3 /proc/loadavg)"
