#!/usr/bin/env bash
# bench/latency.sh — produce latency of the Qanat broker at fixed rates, per fsync setting,
# with the kernel stacks of broker threads seen blocked (D state) during each run.
#
# What it does, for each fsync setting in LAT_FSYNC and each rate in LAT_RATES:
#   starts a fresh broker (release build) with `[storage] fsync = <setting>`, runs
#   `qanat-bench kafka-produce` (1 KiB records, acks=1, linger.ms=1, paced at the rate) for
#   LAT_SECS seconds, and samples /proc/<broker>/task/*/stack every 10 ms for threads in D
#   state (needs root to read kernel stacks; without it the column says so).
# Output: one markdown table on stdout (p50/p99/p99.9/max; the broker's own count of Produce
# requests that took over 5 ms to answer, from its `qanat_request_seconds` histogram, which
# tells a stall in the broker from one in the client or the scheduler; D-state samples of
# threads in a sync call, of all other threads — appends among them — and the function those
# others were most often blocked in; the CPU the broker and the client each took per second of
# the run, which says how much of the machine's cores the pair left free for scheduling; the
# host's steal share of CPU time during the run, which says whether the host, not the broker,
# slowed it); progress on stderr. All traffic goes to 127.0.0.1.
#
# Env:  LAT_RATES  (default "65000 122000 244000") records/s
#       LAT_FSYNC  (default "1000 3600000") fsync settings; 3600000 is periodic fsync pushed out
#       LAT_SECS   (default 10) seconds per run
#       LAT_CLIENT (default librdkafka) the producer: librdkafka or native
#       LAT_TIMELINE_MS  when set, each run's latency per window of this many ms of send time
#                  goes to stderr (`qanat-bench --latency-timeline-ms`)
#       LAT_STACKS_DIR  when set, each run's sampled D-state stacks are kept there, one file per
#                  run (dstacks-<fsync>-<rate>-<n>), for the blocked call chains in full
#       LAT_RESERVE_TRACE  when set (needs root and perf), each run also records the broker's
#                  block reservations and releases (fallocate, ftruncate) with their call
#                  stacks and durations, and a second table says how many were made on the
#                  append path (under a Produce: `Partition::append`, a roll) and elsewhere
#                  (the sync thread, the tick), with the longest of each
#       BENCH_QANAT_BIN, BENCH_BENCH_BIN  binaries to run instead of this tree's release build
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
CLIENT=${LAT_CLIENT:-librdkafka}
TIMELINE=()
[[ -n "${LAT_TIMELINE_MS:-}" ]] && TIMELINE=(--latency-timeline-ms "$LAT_TIMELINE_MS")

start_tmp qanat-latency
build_release qanat qanat-bench
broker_under_test
BENCH_BIN=${BENCH_BENCH_BIN:-$BENCH_BIN}

RESERVE_ROWS=()
# reserve_calls PERF_DATA PID: "calls on the append path | longest ms | calls elsewhere |
# longest ms" for PID's fallocate/ftruncate calls recorded in PERF_DATA.
reserve_calls() {
  perf script -i "$1" -F pid,tid,time,event,ip,sym 2>/dev/null | awk -v pid="$2" '
    function flush() {
      if (ev ~ /sys_enter/ && p == pid) { start[t] = ts; path[t] = append }
      else if (ev ~ /sys_exit/ && p == pid && (t in start)) {
        ms = (ts - start[t]) * 1000
        if (path[t]) { a++; if (ms > amax) amax = ms } else { o++; if (ms > omax) omax = ms }
        delete start[t]
      }
      ev = ""
    }
    /^ *[0-9]+\/[0-9]+ / { flush(); split($1, pt, "/"); p = pt[1]; t = pt[2]
      ts = $2 + 0; ev = $3; append = 0; next }
    /Partition::append|roll_locked/ { append = 1 }
    END { flush(); printf "%d | %.1f | %d | %.1f", a, amax, o, omax }'
}

echo "| fsync | rate rec/s | p50 ms | p99 ms | p99.9 ms | max ms | broker Produce > 5 ms / all | D-state samples in a sync | other D-state samples | others most often blocked in | broker CPU-s/s | client CPU-s/s | host steal |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for fsync in $FSYNCS; do
  for rate in $RATES; do
    run="$TMP/run-$fsync-$rate"
    mkdir -p "$run"
    printf '[storage]\nfsync = %s\n' "$fsync" >"$run/qanat.toml"
    "$QANAT_BIN" broker --data-dir "$run/data" --listen 127.0.0.1:0 --config "$run/qanat.toml" \
      --metrics-listen 127.0.0.1:0 >"$run/out" 2>"$run/err" &
    broker=$!
    PIDS+=("$broker")
    addr=$(wait_line "$run/out" "qanat broker listening on " "$broker") || die "broker did not start"
    metrics=$(wait_line "$run/out" "qanat metrics listening on " "$broker") || die "no metrics endpoint"
    # Bash builtins only (no process per look): a sampler that forks per thread every 2 ms
    # takes enough CPU on a small machine to show up in the latencies it is there to explain.
    (
      mkfifo "$run/never" && exec {never}<>"$run/never" # holds both ends: reads only time out
      is_root=$((EUID == 0))
      while [ -d /proc/"$broker" ]; do
        for t in /proc/"$broker"/task/*; do
          read -r st <"$t/stat" 2>/dev/null || continue
          st=${st##*) }
          if [ "${st%% *}" = D ]; then
            echo "== sample"
            # Unreadable: not root, or (as root) the thread ended meanwhile.
            cat "$t/stack" 2>/dev/null || ((is_root)) || echo "(no stack: not root)"
          fi
        done
        read -r -t 0.01 -u "$never" _ || true
      done
    ) >"$run/dstacks" 2>/dev/null &
    sampler=$!
    if [[ -n "${LAT_RESERVE_TRACE:-}" ]]; then
      perf record -a -q -o "$run/perf.data" --call-graph dwarf,16384 \
        -e syscalls:sys_enter_fallocate -e syscalls:sys_exit_fallocate \
        -e syscalls:sys_enter_ftruncate -e syscalls:sys_exit_ftruncate >/dev/null 2>&1 &
      tracer=$!
      PIDS+=("$tracer")
    fi
    log "fsync=$fsync rate=$rate client=$CLIENT"
    read -r steal0 total0 < <(cpu_times)
    broker_cpu0=$(cpu_secs "$broker") t0=$EPOCHREALTIME
    timeout $((SECS + 60)) "$BENCH_BIN" kafka-produce --client "$CLIENT" --bootstrap "$addr" \
      --topic lat --record-size 1024 --count 1000000000 --acks 1 --linger-ms 1 --rate "$rate" \
      --max-secs "$SECS" "${TIMELINE[@]}" >"$run/bench.json" 2>"$run/bench.err" ||
      log "client failed: $(tail -2 "$run/bench.err")"
    steal=$(steal_since "$steal0" "$total0")
    broker_cpu=$(awk -v c0="$broker_cpu0" -v c1="$(cpu_secs "$broker")" -v t0="$t0" -v t1="$EPOCHREALTIME" \
      'BEGIN { printf "%.2f", (c1 - c0) / (t1 - t0) }')
    if [[ -n "${LAT_RESERVE_TRACE:-}" ]]; then
      kill -INT "$tracer" 2>/dev/null || true
      wait "$tracer" 2>/dev/null || true
      RESERVE_ROWS+=("| $fsync | $rate | $(reserve_calls "$run/perf.data" "$broker") |")
    fi
    if [[ ${#TIMELINE[@]} -gt 0 ]]; then
      grep -A100000 "latency by send time" "$run/bench.err" >&2 || true
    fi
    slow=$(curl -fsS "http://$metrics/metrics" | awk '
      /^qanat_request_seconds_bucket\{api="Produce",le="0.005"\}/ { fast = $2 }
      /^qanat_request_seconds_count\{api="Produce"\}/ { all = $2 }
      END { if (all == "") print "-"; else printf "%d / %d\n", all - fast, all }') || slow="-"
    stop_pids "$broker"
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    # A sample is the sync's own wait (it runs on its own thread) when its stack is in a sync
    # call; the others are what appends and everything else waited on.
    read -r syncs others top < <(awk '
      /^== sample/ { flush(); n = 0; sync = 0; next }
      { sub(/^\[<[^>]*>\] /, ""); sub(/\+0x.*/, ""); n++; if (n == 1) first = $0
        if ($0 ~ /sync_file_range|fdatasync|fsync/) sync = 1 }
      function flush() { if (n == 0) return; if (sync) s++; else { o++; c[first]++ } }
      END { flush(); best = "-"; for (f in c) if (c[f] > c[best]) best = f
            printf "%d %d %s\n", s, o, best }' "$run/dstacks")
    jq -r --arg f "$fsync" --arg r "$rate" --arg s "$syncs" --arg o "$others" --arg t "$top" \
      --arg b "$slow" --arg st "$steal" --arg bc "$broker_cpu" \
      '"| \($f) | \($r) | \(.lat_p50_ms) | \(.lat_p99_ms) | \(.lat_p999_ms) | \(.lat_max_ms) | \($b) | \($s) | \($o) | \($t) | \($bc) | \(if .cpu_secs then (.cpu_secs / .secs * 100 | round / 100) else "-" end) | \($st) |"' \
      "$run/bench.json" || echo "| $fsync | $rate | failed | | | | | | | | | | |"
    if [[ -n "${LAT_STACKS_DIR:-}" ]]; then
      mkdir -p "$LAT_STACKS_DIR"
      n=1
      while [[ -e "$LAT_STACKS_DIR/dstacks-$fsync-$rate-$n" ]]; do n=$((n + 1)); done
      cp "$run/dstacks" "$LAT_STACKS_DIR/dstacks-$fsync-$rate-$n"
    fi
    rm -rf "$run/data"
  done
done
if [[ ${#RESERVE_ROWS[@]} -gt 0 ]]; then
  echo
  echo "| fsync | rate rec/s | fallocate/ftruncate on the append path | longest ms | elsewhere (sync thread, tick) | longest ms |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${RESERVE_ROWS[@]}"
fi
echo
echo "Machine: $(nproc) cores; load average at end $(cut -d' ' -f1-3 /proc/loadavg)"
