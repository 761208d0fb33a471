#!/usr/bin/env bash
# bench/iggy.sh — broker CPU per GB produced: the Qanat broker beside Apache Iggy's server, in
# the same run, one producer writing 1,000-byte messages to one partition.
#
# Iggy is not built by this script: IGGY_DIR names a directory holding a release build of
# `iggy-server` and `iggy-bench` from apache/iggy at tag `server-0.8.0` (`cargo build --release
# -p server -p iggy-bench` in its tree; on Debian it needs libhwloc-dev and libudev-dev; its
# rust-toolchain.toml pins rustc 1.94.0: where only a newer toolchain is installed, remove that
# file or set RUSTUP_TOOLCHAIN=stable, and the tree builds with it).
#
# For each of BENCH_RUNS rounds, alternating: a fresh Qanat broker (default config: periodic
# fsync every 1 s) and `qanat-bench kafka-produce` (acks=1, librdkafka, 1 MiB batches); the same
# with `[storage] fsync = 30000`, the interval of Iggy's default message saver (Iggy's partition
# writes do not fsync, `[system.partition] enforce_fsync = false`; its saver runs every 30 s), so
# that one Qanat row syncs as often as Iggy does; a fresh Iggy server (its defaults) and
# `iggy-bench pinned-producer tcp` (batches of 1,000 messages). Each writes BENCH_GB GB of
# message bodies; the server's CPU (utime+stime from /proc/PID/stat) is read before and after.
# A broker's fdatasync writes back its dirty pages on its own CPU; pages left unsynced are
# written back by the kernel's flusher threads, which no server's figure includes.
# Output: a markdown table (per run and median: MB/s, server CPU-s/GB, p99 where the client
# reports it, server peak RSS) on stdout; progress on stderr.
#
# Env:  IGGY_DIR (required), BENCH_RUNS (default 3), BENCH_GB (default 2),
#       BENCH_TMPDIR (default /tmp) parent of the data dirs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_TAG=iggy
RUNS=${BENCH_RUNS:-3}
GB=${BENCH_GB:-2}
MESSAGE_BYTES=1000
MESSAGES=$((GB * 1000000))

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v jq >/dev/null || die "jq is required (apt-get install jq)"
[[ -n "${IGGY_DIR:-}" ]] || die "set IGGY_DIR to a directory with iggy-server and iggy-bench (apache/iggy, tag server-0.8.0, release build)"
[[ -x "$IGGY_DIR/iggy-server" && -x "$IGGY_DIR/iggy-bench" ]] || die "no iggy-server/iggy-bench in $IGGY_DIR"
if [[ -n "${BENCH_QANAT_BIN:-}" ]]; then
  QANAT_BIN=$BENCH_QANAT_BIN
  BENCH_BIN=$(dirname "$BENCH_QANAT_BIN")/qanat-bench
else
  build_release qanat qanat-bench
fi
start_tmp qanat-iggy

# run_qanat N FSYNC: one round with `[storage] fsync = FSYNC`; prints "MB/s CPU-s/GB p99 RSS".
run_qanat() {
  local dir="$TMP/qanat-$1-$2" pid addr c0 c1 out
  mkdir -p "$dir/data"
  printf '[storage]\nfsync = %s\n' "$2" >"$dir/qanat.toml"
  "$QANAT_BIN" broker --listen 127.0.0.1:0 --data-dir "$dir/data" --config "$dir/qanat.toml" \
    >"$dir/stdout" 2>"$dir/stderr" &
  pid=$!
  PIDS+=("$pid")
  addr=$(wait_line "$dir/stdout" "qanat broker listening on " "$pid") || die "the Qanat broker did not start: $(tail -n 5 "$dir/stderr")"
  "$QANAT_BIN" topics create bench --partitions 1 --bootstrap "$addr" >"$dir/create.log" 2>&1 ||
    die "topics create: $(tail -n 5 "$dir/create.log")"
  c0=$(cpu_secs "$pid")
  out=$(timeout 600 "$BENCH_BIN" kafka-produce --bootstrap "$addr" --topic bench --partitions 1 \
    --record-size "$MESSAGE_BYTES" --count "$MESSAGES" --acks 1 --max-secs 300 2>"$dir/produce.err" | tail -n1) ||
    die "qanat-bench failed: $(tail -n 5 "$dir/produce.err")"
  c1=$(cpu_secs "$pid")
  [[ "$(jq -r '.errors' <<<"$out")" == 0 ]] || die "produce errors: $out"
  awk -v m="$(jq -r '.mb_per_s' <<<"$out")" -v a="$c0" -v b="$c1" -v n="$(jq -r '.bytes' <<<"$out")" \
    -v r="$(vm_hwm_mib "$pid")" 'BEGIN { printf "%.1f %.2f - %s\n", m, (b - a) / (n / 1e9), r }'
  stop_pids "$pid"
  rm -rf "$dir"
}

# run_iggy N: one round; prints "MB/s CPU-s/GB p99 RSS".
run_iggy() {
  local dir="$TMP/iggy-$1" pid c0 c1 mbps p99
  mkdir -p "$dir"
  (cd "$dir" && IGGY_SYSTEM_PATH="$dir/data" IGGY_ROOT_USERNAME=iggy IGGY_ROOT_PASSWORD=iggy \
    exec "$IGGY_DIR/iggy-server" >"$dir/server.log" 2>&1) &
  pid=$!
  PIDS+=("$pid")
  wait_line "$dir/server.log" ".*Iggy TCP server has started on: " "$pid" >/dev/null ||
    die "iggy-server did not start: $(tail -n 5 "$dir/server.log")"
  c0=$(cpu_secs "$pid")
  timeout 600 "$IGGY_DIR/iggy-bench" -u iggy -p iggy -m "$MESSAGE_BYTES" -P 1000 -b $((MESSAGES / 1000)) \
    pp -s 1 -p 1 tcp >"$dir/bench.log" 2>&1 || die "iggy-bench failed: $(tail -n 5 "$dir/bench.log")"
  c1=$(cpu_secs "$pid")
  mbps=$(grep -o 'Total throughput: [0-9.]* MB/s' "$dir/bench.log" | head -n1 | awk '{ print $3 }')
  p99=$(grep -o 'p99 latency: [0-9.]* ms' "$dir/bench.log" | head -n1 | awk '{ print $3 }')
  [[ -n "$mbps" ]] || die "no throughput in iggy-bench's output: $(tail -n 5 "$dir/bench.log")"
  awk -v m="$mbps" -v a="$c0" -v b="$c1" -v n="$((MESSAGES * MESSAGE_BYTES))" -v p="${p99:--}" \
    -v r="$(vm_hwm_mib "$pid")" 'BEGIN { printf "%.1f %.2f %s %s\n", m, (b - a) / (n / 1e9), p, r }'
  stop_pids "$pid"
  rm -rf "$dir"
}

machine_start
Q_MB="" Q_CPU="" I_MB="" I_CPU="" Q_RUNS="" I_RUNS="" S_MB="" S_CPU="" S_RUNS=""
for run in $(seq "$RUNS"); do
  run_qanat "$run" 1000 >"$TMP/row"
  read -r mb cpu _ rss <"$TMP/row"
  log "qanat, run $run: $mb MB/s, $cpu CPU-s/GB, peak RSS $rss MiB (load $(cut -d' ' -f1 /proc/loadavg))"
  Q_MB+=" $mb" Q_CPU+=" $cpu" Q_RUNS+="${Q_RUNS:+, }$mb / $cpu" Q_RSS=$rss
  run_qanat "$run" 30000 >"$TMP/row"
  read -r mb cpu _ rss <"$TMP/row"
  log "qanat fsync 30 s, run $run: $mb MB/s, $cpu CPU-s/GB, peak RSS $rss MiB (load $(cut -d' ' -f1 /proc/loadavg))"
  S_MB+=" $mb" S_CPU+=" $cpu" S_RUNS+="${S_RUNS:+, }$mb / $cpu" S_RSS=$rss
  run_iggy "$run" >"$TMP/row"
  read -r mb cpu p99 rss <"$TMP/row"
  log "iggy, run $run: $mb MB/s, $cpu CPU-s/GB, p99 $p99 ms, peak RSS $rss MiB (load $(cut -d' ' -f1 /proc/loadavg))"
  I_MB+=" $mb" I_CPU+=" $cpu" I_RUNS+="${I_RUNS:+, }$mb / $cpu" I_RSS=$rss
done

echo "| server | produce MB/s (median) | server CPU-s/GB (median) | server peak RSS | runs (MB/s / CPU-s/GB) |"
echo "|---|---|---|---|---|"
echo "| qanat broker (Kafka protocol, librdkafka producer, acks=1; default fsync every 1 s) | $(median <<<"$Q_MB") | $(median <<<"$Q_CPU") | $Q_RSS MiB | $Q_RUNS |"
echo "| qanat broker, fsync = 30000 (Iggy's default saver interval) | $(median <<<"$S_MB") | $(median <<<"$S_CPU") | $S_RSS MiB | $S_RUNS |"
echo "| iggy-server 0.8.0 (iggy-bench pinned producer, TCP) | $(median <<<"$I_MB") | $(median <<<"$I_CPU") | $I_RSS MiB | $I_RUNS |"
echo
echo "One producer, one partition, ${MESSAGE_BYTES}-byte messages, $GB GB per run, $RUNS alternating rounds; each"
echo "server fresh per run with its default configuration (but the fsync interval of the second Qanat row)."
echo "MB = 10^6 bytes of message bodies."
echo "Client and server share the machine: $(machine_summary)."
