#!/usr/bin/env bash
# bench/partitions.sh — how the broker's produce path scales with partitions, and its CPU per GB.
#
# What it does:
#   1. builds `qanat` and `qanat-bench` (release);
#   2. BENCH_RUNS rounds, each running every row of P in {1, 8, 64} × partitioner × client
#      (× broker build) once, in turn, so that drift over the bench falls on all rows alike.
#      A row's run: a fresh broker (default config, so periodic fsync every 1000 ms; Prometheus
#      metrics on, as in production), one P-partition topic, `qanat-bench kafka-produce` of
#      1 KiB keyless records, acks=1, until BENCH_COUNT records or BENCH_SECS seconds.
#      Partitioners: `sticky`, what Kafka's clients do with keyless records (a batch's worth to
#      one partition, then another: batches stay full however many partitions there are), and
#      `round-robin`, every record to the next partition (batches P times smaller: the worst
#      case). One partition is run once, the two being the same there. The broker's CPU
#      (utime+stime from /proc/PID/stat) is read just before and just after the produce, and
#      its data dir is deleted after each run;
#   3. a fresh broker, one 1,000-partition topic, BENCH_RSS_PER_PARTITION 1 KiB records produced
#      to every partition, then the broker's peak RSS (VmHWM).
# Output: a markdown table (median of the runs, every run's figures beside it; each row's MB/s
# and broker CPU per GB as a share of the same client's one-partition figure, the median of the
# rounds' own ratios; the client's CPU per GB too, since on a small machine it competes with
# the broker) on stdout;
# progress on stderr.
#
# Env:  BENCH_RUNS (default 3), BENCH_SECS (default 10), BENCH_COUNT (default 6000000 records,
#       which bounds the data written per run to ~6 GB: runs of several seconds, so each spans
#       several of the broker's periodic fsyncs and its CPU per GB is not a matter of whether one
#       fell inside the run), BENCH_RSS_PER_PARTITION (default 20),
#       BENCH_PARTITIONS (default "1 8 64"),
#       BENCH_PARTITIONERS (default "sticky round-robin"),
#       BENCH_CLIENTS (default "librdkafka native"): the producers to run the matrix with —
#       librdkafka (`kafka-produce`, acks=1) and the agent's native producer (`kafka-produce
#       --client native`, which asks acks=all: the same on one broker). librdkafka's own CPU per
#       GB grows with the partition count, and client and broker share the cores, so the native
#       rows show the broker's scaling with a client that is not the limit.
#       BENCH_TMPDIR (default /tmp) parent of the data dirs; /dev/shm keeps the disk out of it.
#       BENCH_QANAT_BIN: the broker binary to measure instead of this tree's; several, separated
#       by spaces, for an A/B comparison: each run then goes through them in turn (interleaved,
#       so the machine's load falls on all alike) and the table has a row per broker.
# All traffic goes to 127.0.0.1. Every client run is under `timeout`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_TAG=partitions
RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECS:-10}
COUNT=${BENCH_COUNT:-6000000}
RSS_PER_PARTITION=${BENCH_RSS_PER_PARTITION:-20}
PARTITION_COUNTS=${BENCH_PARTITIONS:-"1 8 64"}
CLIENTS=${BENCH_CLIENTS:-"librdkafka native"}
PARTITIONERS=${BENCH_PARTITIONERS:-"sticky round-robin"}
RECORD_SIZE=1024
CLIENT_TIMEOUT=300 # seconds, hard cap for any single client run

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v jq >/dev/null || die "jq is required (apt-get install jq)"

start_tmp qanat-partitions
need_kb=$(((COUNT * RECORD_SIZE / 1024) * 2))
free_kb=$(df -Pk "$TMP" | awk 'NR == 2 { print $4 }')
if [[ "$free_kb" -lt "$need_kb" ]]; then
  die "$TMP has $((free_kb / 1024)) MiB free; a run needs about $((need_kb / 1024)) MiB (set BENCH_TMPDIR, e.g. /dev/shm, or lower BENCH_COUNT)"
fi
log "temp dir $TMP, $RUNS runs x {$PARTITION_COUNTS} partitions, up to $COUNT records or ${SECS}s each"

build_release qanat qanat-bench
# Another broker build to compare with (the client stays this tree's qanat-bench).
read -r -a BROKERS <<<"${BENCH_QANAT_BIN:-$QANAT_BIN}"
for QANAT_BIN in "${BROKERS[@]}"; do
  [[ -x "$QANAT_BIN" ]] || die "BENCH_QANAT_BIN $QANAT_BIN is not executable"
done

BROKER_PID=""
BROKER_ADDR=""
BROKER_DIR=""
start_broker() {
  BROKER_DIR="$TMP/$1"
  mkdir -p "$BROKER_DIR/data"
  "$QANAT_BIN" broker --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --data-dir "$BROKER_DIR/data" >"$BROKER_DIR/stdout" 2>"$BROKER_DIR/stderr" &
  BROKER_PID=$!
  PIDS+=("$BROKER_PID")
  BROKER_ADDR=$(wait_line "$BROKER_DIR/stdout" "qanat broker listening on " "$BROKER_PID") || {
    cat "$BROKER_DIR/stderr" >&2 || true
    die "broker $1 failed to start"
  }
}
stop_broker() {
  stop_pids "$BROKER_PID"
  wait "$BROKER_PID" 2>/dev/null || true
  rm -rf "$BROKER_DIR"
}
create_topic() {
  "$QANAT_BIN" topics create "$1" --partitions "$2" --bootstrap "$BROKER_ADDR" >"$TMP/create.log" 2>&1 ||
    die "topics create $1: $(tail -n 5 "$TMP/create.log")"
}
# produce <topic> <partitions> <count> <max secs>: the bench's JSON line on stdout; the client's
# user+sys seconds in $TMP/client.cpu when /usr/bin/time is there
TIME_CMD=()
[[ -x /usr/bin/time ]] && TIME_CMD=(/usr/bin/time -f '%U %S' -o "$TMP/client.time")
# CLIENT (librdkafka or native) picks the producer, PARTITIONER how it spreads the records.
CLIENT=librdkafka
PARTITIONER=round-robin
produce() {
  rm -f "$TMP/client.time"
  local client_args=(--partitioner "$PARTITIONER")
  [[ "$CLIENT" == native ]] && client_args+=(--client native)
  timeout --kill-after=10 "$CLIENT_TIMEOUT" "${TIME_CMD[@]}" "$BENCH_BIN" kafka-produce --bootstrap "$BROKER_ADDR" \
    --topic "$1" --partitions "$2" --record-size "$RECORD_SIZE" --count "$3" --acks 1 \
    "${client_args[@]}" --max-secs "$4" 2>"$TMP/produce.err" | tail -n1 || die "produce to $1 failed: $(tail -n 5 "$TMP/produce.err")"
}
# client_cpu_gb <bytes>: the last produce's client CPU-s/GB, or -
client_cpu_gb() {
  if [[ -s "$TMP/client.time" ]]; then
    awk -v n="$1" '{ printf "%.2f", ($1 + $2) / (n / 1e9) }' "$TMP/client.time"
  else
    echo -
  fi
}

machine_start
# The matrix, one "client parts partitioner label" entry per row. One partition: every
# partitioner sends the same records to it, so it is run once.
CONFIGS=()
for client in $CLIENTS; do
  for parts in $PARTITION_COUNTS; do
    if [[ "$parts" == 1 ]]; then
      CONFIGS+=("$client $parts ${PARTITIONERS%% *} one-partition")
    else
      for partitioner in $PARTITIONERS; do CONFIGS+=("$client $parts $partitioner -"); done
    fi
  done
done
# Each round runs every row (and every broker) once, in turn: the machine drifts over a
# bench's minutes (page cache, disk, neighbours), and the scaling figures are ratios between
# rows, so a drift must fall on all rows alike rather than on whichever ran last.
declare -A MBPS_ALL CPU_ALL CLIENT_ALL RUNS_TEXT
for run in $(seq "$RUNS"); do
  for c in "${!CONFIGS[@]}"; do
    read -r CLIENT parts PARTITIONER _ <<<"${CONFIGS[$c]}"
    for b in "${!BROKERS[@]}"; do
      QANAT_BIN=${BROKERS[$b]}
      key=$c.$b
      start_broker "p$parts-r$run-c$c-b$b"
      topic=bench-$parts
      create_topic "$topic" "$parts"
      cpu0=$(cpu_secs "$BROKER_PID")
      out=$(produce "$topic" "$parts" "$COUNT" "$SECS")
      cpu1=$(cpu_secs "$BROKER_PID")
      kill -0 "$BROKER_PID" 2>/dev/null || die "the broker died during the $parts-partition run"
      errors=$(jq -r '.errors' <<<"$out")
      [[ "$errors" == 0 ]] || die "$parts partitions: $errors produce errors: $(jq -r '.first_error' <<<"$out")"
      mbps=$(jq -r '.mb_per_s' <<<"$out")
      bytes=$(jq -r '.bytes' <<<"$out")
      cpu_gb=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$bytes" 'BEGIN { printf "%.2f", (b - a) / (n / 1e9) }')
      client_gb=$(client_cpu_gb "$bytes")
      log "round $run, broker $((b + 1)), $CLIENT, $parts partitions, $PARTITIONER: $mbps MB/s, broker $cpu_gb CPU-s/GB, client $client_gb CPU-s/GB ($(jq -r '.records' <<<"$out") records; load $(cut -d' ' -f1 /proc/loadavg))"
      MBPS_ALL[$key]+=" $mbps" CPU_ALL[$key]+=" $cpu_gb"
      RUNS_TEXT[$key]+="${RUNS_TEXT[$key]:+, }$mbps / $cpu_gb"
      [[ "$client_gb" != - ]] && CLIENT_ALL[$key]+=" $client_gb"
      stop_broker
    done
  done
done
# paired_ratio <row's runs> <one-partition row's runs>: the median over rounds of the row's
# figure over the one-partition figure of the same round, as a percentage. Paired by round,
# the machine's drift between rounds (larger here than the partition count's effect) cancels.
paired_ratio() {
  [[ -n "$2" ]] || { echo -; return; }
  paste <(tr ' ' '\n' <<<"$1" | grep -v '^$') <(tr ' ' '\n' <<<"$2" | grep -v '^$') |
    awk '$2 > 0 { printf "%.4f ", $1 / $2 }' | median | awk '$1 != "-" { printf "%.0f%%", $1 * 100; next } { print }'
}
# The one-partition row of each client, which the others are compared with.
declare -A ONE_PARTITION
for c in "${!CONFIGS[@]}"; do
  read -r client parts _ <<<"${CONFIGS[$c]}"
  [[ "$parts" == 1 ]] && ONE_PARTITION[$client]=$c
done
ROWS=()
for c in "${!CONFIGS[@]}"; do
  read -r client parts partitioner label <<<"${CONFIGS[$c]}"
  [[ "$label" == one-partition ]] && partitioner="(one partition)"
  for b in "${!BROKERS[@]}"; do
    key=$c.$b broker_col="" base=""
    [[ ${#BROKERS[@]} -gt 1 ]] && broker_col="$((b + 1)) | "
    [[ -n "${ONE_PARTITION[$client]:-}" && "$parts" != 1 ]] && base=${ONE_PARTITION[$client]}.$b
    ROWS+=("| $broker_col$client | $parts | $partitioner | $(median <<<"${MBPS_ALL[$key]}") | $(paired_ratio "${MBPS_ALL[$key]}" "${base:+${MBPS_ALL[$base]}}") | $(median <<<"${CPU_ALL[$key]}") | $(paired_ratio "${CPU_ALL[$key]}" "${base:+${CPU_ALL[$base]}}") | $(median <<<"${CLIENT_ALL[$key]:-}") | ${RUNS_TEXT[$key]} |")
  done
done

QANAT_BIN=${BROKERS[0]}
start_broker rss
create_topic bench-rss 1000
CLIENT=librdkafka PARTITIONER=round-robin # so every partition gets its records
out=$(produce bench-rss 1000 $((1000 * RSS_PER_PARTITION)) 120)
[[ "$(jq -r '.records' <<<"$out")" == $((1000 * RSS_PER_PARTITION)) ]] || die "1,000-partition produce incomplete: $out"
hwm=$(vm_hwm_kb "$BROKER_PID")
stop_broker

head_col="" rule_col="" rss_col=""
[[ ${#BROKERS[@]} -gt 1 ]] && head_col="broker | " rule_col="---|" rss_col="1 | "
echo "| ${head_col}client | partitions | partitioner | produce MB/s (median) | MB/s vs 1 partition | broker CPU-s/GB (median) | CPU-s/GB vs 1 partition | client CPU-s/GB (median) | runs (MB/s / broker CPU-s/GB) |"
echo "|${rule_col}---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo "| ${rss_col}librdkafka | 1,000 (RSS) | round-robin | peak broker RSS (VmHWM) after $RSS_PER_PARTITION records to each partition: $(awk -v k="$hwm" 'BEGIN { printf "%.1f MiB", k / 1024 }') | | | | | |"
echo
echo "1 KiB keyless records, acks=1, default config (fsync every 1000 ms), no compression; up to $COUNT records or ${SECS} s"
echo "per run, fresh broker per run, data in $(df -P "$TMP" | awk 'NR == 2 { print $1 }') ($TMP). MB = 10^6 bytes of record values;"
echo "CPU-s/GB = utime+stime during the produce / 10^9 bytes of record values (broker: from /proc/PID/stat;"
echo "client: qanat-bench with librdkafka or the native producer, from /usr/bin/time). Client and broker share the machine's cores,"
echo "so MB/s falls when the client needs more CPU per GB (it does with more partitions). sticky: the clients' default for"
echo "keyless records (librdkafka chooses the partition itself; the native producer moves on after each --batch-bytes);"
echo "round-robin: every record to the next partition, so batches are P times smaller. \"vs 1 partition\": the median over"
echo "rounds of the row's figure / the same client's one-partition figure in that round (rounds run every row in turn)."
for b in "${!BROKERS[@]}"; do
  echo "Broker${head_col:+ $((b + 1))}: ${BROKERS[$b]}."
done
echo "Machine: $(machine_summary)."
