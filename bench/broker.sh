#!/usr/bin/env bash
# bench/broker.sh — throughput / latency / memory benchmark of the Qanat broker, with NATS
# JetStream (file storage) on 127.0.0.1:4222 as the peer.
#
# What it does:
#   1. builds `qanat` and `qanat-bench` (release);
#   2. measures the disk's sequential write bandwidth (fio, else dd) in the bench temp dir;
#   3. broker A, `[storage] fsync = 1000` (periodic, every 1000 ms): acks=1 matrix
#      {100 B, 1 KiB} x {1, 8 partitions}: produce (open loop, max throughput) then consume;
#      then latency runs at half the max rate of (1 KiB, 1 partition, acks=1), linger 1 ms,
#      with librdkafka and with the agent's native producer;
#   4. broker B, `[storage] fsync = "always"` (fsync before every ack): the same matrix, acks=all;
#   5. broker C, periodic fsync: one 100-partition topic, 1 KiB records -> peak RSS;
#   5b. broker D, periodic fsync, a PLAINTEXT and a SASL_SSL listener (SCRAM-SHA-512, TLS with
#      a certificate made here by openssl): the same 1 KiB / 1 partition / acks=1 produce and
#      consume through each, side by side in the same run (TLS cost), each produced by librdkafka
#      and by the agent's native producer (`kafka-produce --client`; it always asks acks=all,
#      the same on one broker, and its records carry the agent's trajectory headers), with the
#      broker's and the client's CPU seconds per GB produced for each (the client reports its
#      own CPU time);
#   6. NATS JetStream: the same produce/consume workloads (subjects = partitions, async acks,
#      window 4096) and a latency run at half its own max rate; then broker E (periodic fsync)
#      runs the Qanat latency row again at JetStream's half-max rate, so both compare at one load
#      (BENCH_LATENCY_ROUNDS times, alternating, each Qanat round on a fresh broker).
# Output: one markdown table on stdout plus summary lines; progress on stderr.
#
# Env:  BENCH_SCALE   (default 1) multiplies durations and record counts; 0.05 = smoke run.
#       BENCH_TMPDIR  (default /tmp) parent of the temp dir (data dirs and fio file live there).
#       NATS_SERVER   (default 127.0.0.1:4222); BENCH_SKIP_NATS=1 skips the peer,
#       BENCH_SKIP_QANAT=1 skips the Qanat broker runs A-C, BENCH_SKIP_TLS=1 the run D.
#       BENCH_LATENCY_ROUNDS (default 1) pairs of latency runs at JetStream's half-max rate.
#       BENCH_QANAT_BIN: a broker binary to measure instead of this tree's (A/B comparisons).
# All traffic goes to 127.0.0.1. The script stops by itself: every client run is under `timeout`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${BENCH_SCALE:-1}
NATS_SERVER=${NATS_SERVER:-127.0.0.1:4222}
CLIENT_TIMEOUT=300 # seconds, hard cap for any single client run

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v jq >/dev/null || die "jq is required (apt-get install jq)"
case "$NATS_SERVER" in 127.0.0.1:* | localhost:*) ;; *) die "NATS_SERVER must be on 127.0.0.1" ;; esac

# scaled integer: s <base> [min]
s() { awk -v b="$1" -v k="$SCALE" -v m="${2:-1}" 'BEGIN { v = int(b * k); if (v < m) v = m; print v }'; }
# scaled seconds (float): sf <base> [min]
sf() { awk -v b="$1" -v k="$SCALE" -v m="${2:-0.5}" 'BEGIN { v = b * k; if (v < m) v = m; printf "%.2f", v }'; }

PRODUCE_SECS=$(sf 8)    # each throughput produce stops after this long ...
LAT_SECS=$(sf 10)       # ... latency runs last this long
LAT_ROUNDS=${BENCH_LATENCY_ROUNDS:-1}
declare -A MAX_COUNT=([100]=$(s 20000000 2000) [1024]=$(s 6000000 1000)) # ... or at this count

# ---------------------------------------------------------------------------------------------
# temp dir, cleanup

TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/qanat-bench.XXXXXX")
BROKER_PIDS=()
NATS_STREAMS=()
cleanup() {
  local rc=$?
  set +e
  stop_pids "${BROKER_PIDS[@]}"
  if [[ -n "${BENCH_BIN:-}" ]]; then
    for st in "${NATS_STREAMS[@]}"; do
      timeout 30 "$BENCH_BIN" nats-delete-stream --server "$NATS_SERVER" --stream "$st" >/dev/null 2>&1
    done
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log "temp dir $TMP, BENCH_SCALE=$SCALE"
machine_start

# ---------------------------------------------------------------------------------------------
# build

build_release qanat qanat-bench
broker_under_test

# ---------------------------------------------------------------------------------------------
# disk bandwidth

DISK_SIZE_MB=$(s 2048 256)
if command -v fio >/dev/null; then
  log "disk: fio sequential write ${DISK_SIZE_MB} MiB (psync, bs=1M, end_fsync) in $TMP"
  DISK_MBPS=$(fio --name=seq --rw=write --bs=1M --size="${DISK_SIZE_MB}M" --ioengine=psync \
    --end_fsync=1 --directory="$TMP" --output-format=json 2>/dev/null |
    jq '.jobs[0].write.bw_bytes / 1e6 | . * 10 | round / 10')
  DISK_TOOL="fio --rw=write --bs=1M --size=${DISK_SIZE_MB}M --ioengine=psync --end_fsync=1"
else
  log "disk: dd ${DISK_SIZE_MB} MiB conv=fdatasync in $TMP"
  DISK_MBPS=$(LC_ALL=C dd if=/dev/zero of="$TMP/ddfile" bs=1M count="$DISK_SIZE_MB" conv=fdatasync 2>&1 |
    awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+$/ && $(i+1) == "s,") secs = $i }
         END { if (secs > 0) printf "%.1f", '"$DISK_SIZE_MB"' * 1048576 / secs / 1e6 }')
  DISK_TOOL="dd bs=1M count=$DISK_SIZE_MB conv=fdatasync"
fi
rm -f "$TMP"/seq.* "$TMP/ddfile"
[[ -n "$DISK_MBPS" ]] || die "could not measure disk bandwidth"
log "disk sequential write: $DISK_MBPS MB/s"
echo "Disk sequential write bandwidth: **${DISK_MBPS} MB/s** (\`$DISK_TOOL\`, in the bench temp dir)"
echo

# ---------------------------------------------------------------------------------------------
# process accounting from /proc

vm_rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }

# ---------------------------------------------------------------------------------------------
# broker lifecycle

BROKER_PID=""
BROKER_ADDR=""
BROKER_DIR=""
BROKER_T0=0
# start_broker <name> <fsync toml value> [extra toml]
start_broker() {
  local name=$1 fsync=$2
  BROKER_DIR="$TMP/$name"
  mkdir -p "$BROKER_DIR/data"
  printf '[storage]\nfsync = %s\n%s\n' "$fsync" "${3:-}" >"$BROKER_DIR/qanat.toml"
  log "starting broker $name (fsync = $fsync)"
  "$QANAT_BIN" broker --listen 127.0.0.1:0 --data-dir "$BROKER_DIR/data" \
    --config "$BROKER_DIR/qanat.toml" >"$BROKER_DIR/stdout" 2>"$BROKER_DIR/stderr" &
  BROKER_PID=$!
  BROKER_PIDS+=("$BROKER_PID")
  BROKER_T0=$(date +%s.%N)
  BROKER_ADDR=$(wait_line "$BROKER_DIR/stdout" "qanat broker listening on " "$BROKER_PID") || true
  if [[ -z "$BROKER_ADDR" ]]; then
    log "broker $name did not report its address; stdout/stderr:"
    cat "$BROKER_DIR/stdout" "$BROKER_DIR/stderr" >&2 || true
    die "broker $name failed to start"
  fi
  log "broker $name pid $BROKER_PID listening on $BROKER_ADDR"
}

# stop_broker <summary label> : appends an RSS/CPU line to SUMMARY
stop_broker() {
  local label=$1 hwm cpu wall
  if ! kill -0 "$BROKER_PID" 2>/dev/null; then
    SUMMARY+=("- $label: **broker process died** during the run (see broker stderr below)")
    BROKER_LOGS+=("$BROKER_DIR")
    return
  fi
  hwm=$(vm_hwm_kb "$BROKER_PID")
  cpu=$(cpu_secs "$BROKER_PID")
  wall=$(awk -v a="$BROKER_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  SUMMARY+=("- $label: peak RSS (VmHWM) $(mib "$hwm"), CPU ${cpu} s user+sys over ${wall} s wall")
  kill -TERM "$BROKER_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$BROKER_PID" 2>/dev/null; then
    log "broker did not exit within 10 s of SIGTERM; killing"
    SUMMARY+=("  - note: the broker did not exit within 10 s of SIGTERM and was killed")
    kill -KILL "$BROKER_PID" 2>/dev/null || true
  fi
  wait "$BROKER_PID" 2>/dev/null || true
  if [[ -s "$BROKER_DIR/stderr" ]]; then
    local lines
    lines=$(grep -ciE 'error|panic|warn' "$BROKER_DIR/stderr" || true)
    if [[ "$lines" -gt 0 ]]; then
      BROKER_LOGS+=("$BROKER_DIR")
    fi
  fi
}

# ---------------------------------------------------------------------------------------------
# running clients

ROWS=()
SUMMARY=()
FAILURES=()
BROKER_LOGS=()
declare -A PRODUCE_MBPS=()

# run_client <log name> <args...> : runs qanat-bench; its JSON line (last stdout line) goes to
# OUT; returns non-zero on failure (stderr kept in $TMP/logs/<name>.err). Call it directly, not in
# $(...), so FAILURES survives.
OUT=""
run_client() {
  local name=$1
  shift
  local rc=0
  timeout --kill-after=10 "$CLIENT_TIMEOUT" "$BENCH_BIN" "$@" >"$TMP/logs/$name.out" 2>"$TMP/logs/$name.err" || rc=$?
  OUT=$(tail -n1 "$TMP/logs/$name.out")
  if [[ $rc -ne 0 ]]; then
    local why="exit $rc"
    [[ $rc -eq 124 ]] && why="timed out after ${CLIENT_TIMEOUT}s"
    FAILURES+=("$name ($why): $(grep -v '^ *[0-9]*: \|^ *at \|^Stack backtrace' "$TMP/logs/$name.err" | tail -n 15)")
    log "$name FAILED ($why)"
    return 1
  fi
  return 0
}

j() { jq -r "$1 // empty" <<<"$2" 2>/dev/null || true; }
fmt_mb() { [[ -n "$1" ]] && printf '%.1f' "$1" || printf -- '-'; }
fmt_int() { [[ -n "$1" ]] && printf '%.0f' "$1" || printf -- '-'; }
fmt_lat() {
  local a b c
  a=$(j .lat_p50_ms "$1") b=$(j .lat_p99_ms "$1") c=$(j .lat_p999_ms "$1")
  [[ -n "$a" ]] && printf '%.1f / %.1f / %.1f' "$a" "$b" "$c" || printf -- '-'
}

# add_row <system> <size> <parts> <acks/fsync> <produce json> <consume json> [note]
add_row() {
  local p=$5 c=$6 note=${7:-}
  local pm pr cm cr
  pm=$(fmt_mb "$(j .mb_per_s "$p")") pr=$(fmt_int "$(j .records_per_s "$p")")
  cm=$(fmt_mb "$(j .mb_per_s "$c")") cr=$(fmt_int "$(j .records_per_s "$c")")
  [[ -n "$note" ]] && note=" ($note)"
  ROWS+=("| $1 | $2 B | $3 | $4 | $pm | $pr | $cm | $cr | $(fmt_lat "$p")$note |")
}

# kafka_row <size> <partitions> <acks> <fsync label>
kafka_row() {
  local size=$1 parts=$2 acks=$3 flabel=$4
  local topic="bench-${size}b-${parts}p-acks${acks}"
  local pj="" cj="" note=""
  log "qanat: topic $topic: create"
  if ! "$QANAT_BIN" topics create "$topic" --partitions "$parts" --bootstrap "$BROKER_ADDR" \
    >"$TMP/logs/$topic.create" 2>&1; then
    FAILURES+=("topics create $topic: $(tail -n 5 "$TMP/logs/$topic.create")")
    add_row qanat "$size" "$parts" "$flabel" "" "" "topic create failed"
    return
  fi
  log "qanat: $topic: produce ${size} B x up to ${MAX_COUNT[$size]} for up to ${PRODUCE_SECS}s, acks=$acks"
  run_client "produce-$topic" kafka-produce --bootstrap "$BROKER_ADDR" --topic "$topic" \
    --partitions "$parts" --record-size "$size" --count "${MAX_COUNT[$size]}" --acks "$acks" \
    --max-secs "$PRODUCE_SECS" || note="produce FAILED"
  pj=$OUT
  log "  produce: $pj"
  PRODUCE_MBPS["$size/$parts/$acks"]=$(j .mb_per_s "$pj")
  local n
  n=$(j .records "$pj")
  if [[ -n "$n" && "$n" -gt 0 ]]; then
    log "qanat: $topic: consume $n records"
    run_client "consume-$topic" kafka-consume --bootstrap "$BROKER_ADDR" --topic "$topic" \
      --partitions "$parts" --count "$n" || note="${note:+$note, }consume FAILED"
    cj=$OUT
    log "  consume: $cj"
  fi
  add_row qanat "$size" "$parts" "$flabel" "$pj" "$cj" "$note"
}

# qanat_latency_row <rate> <why this rate> [client]: a paced 1 KiB / 1 partition / acks=1
# produce with linger.ms=1 at <rate> records/s on the running broker, for LAT_SECS; adds the
# latency row. client: librdkafka (default) or native (the agent's producer, which asks
# acks=all, the same on one broker; latency from its `send` to the delivery report).
qanat_latency_row() {
  local rate=$1 why=$2 client=${3:-librdkafka} count topic lj label
  count=$(awk -v r="$rate" -v t="$LAT_SECS" 'BEGIN { printf "%d", r * t }')
  topic="bench-latency-1024b-1p-$rate-$client"
  log "qanat: latency run ($client): $count x 1 KiB at $rate rec/s ($why)"
  if ! "$QANAT_BIN" topics create "$topic" --partitions 1 --bootstrap "$BROKER_ADDR" >"$TMP/logs/$topic.create" 2>&1; then
    FAILURES+=("topics create $topic: $(tail -n 5 "$TMP/logs/$topic.create")")
    return
  fi
  run_client "produce-$topic" kafka-produce --bootstrap "$BROKER_ADDR" --topic "$topic" \
    --partitions 1 --record-size 1024 --count "$count" --acks 1 --rate "$rate" --linger-ms 1 \
    --client "$client" --max-secs "$(awk -v t="$LAT_SECS" 'BEGIN { print t + 5 }')" || true
  lj=$OUT
  log "  latency: $lj"
  label="qanat (latency @ $rate rec/s)"
  [[ "$client" == native ]] && label="qanat, native producer (latency @ $rate rec/s)"
  add_row "$label" 1024 1 "$FS_PERIODIC" "$lj" "" "paced, $why"
}

mkdir -p "$TMP/logs"

FS_PERIODIC="acks=1 / fsync every 1000 ms"
FS_ALWAYS="acks=all / fsync always"
if [[ "${BENCH_SKIP_QANAT:-0}" != 1 ]]; then
# ---------------------------------------------------------------------------------------------
# Qanat, broker A: periodic fsync, acks=1

start_broker A 1000
for size in 100 1024; do
  for parts in 1 8; do
    kafka_row "$size" "$parts" 1 "$FS_PERIODIC"
  done
done

MAXRATE=$(j .records_per_s "$(tail -n1 "$TMP/logs/produce-bench-1024b-1p-acks1.out" 2>/dev/null || true)")
if [[ -n "$MAXRATE" ]] && awk -v r="$MAXRATE" 'BEGIN { exit !(r >= 2) }'; then
  qanat_latency_row "$(awk -v r="$MAXRATE" 'BEGIN { printf "%d", r / 2 }')" "half of its own max $MAXRATE"
  # librdkafka on 2 cores may not keep this pace (its rec/s column says); the native producer
  # costs less per record, so its row shows the broker's latency at the same asked rate.
  qanat_latency_row "$(awk -v r="$MAXRATE" 'BEGIN { printf "%d", r / 2 }')" "half of its own max $MAXRATE" native
else
  log "no max rate for 1 KiB/1p/acks=1; skipping the latency run"
  SUMMARY+=("- latency run skipped: the 1 KiB / 1 partition / acks=1 run produced no rate")
fi
stop_broker "Qanat broker A (fsync every 1000 ms; acks=1 rows and the latency row)"

# ---------------------------------------------------------------------------------------------
# Qanat, broker B: fsync always, acks=all

start_broker B '"always"'
for size in 100 1024; do
  for parts in 1 8; do
    kafka_row "$size" "$parts" all "$FS_ALWAYS"
  done
done
stop_broker "Qanat broker B (fsync always; acks=all rows)"

# ---------------------------------------------------------------------------------------------
# Qanat, broker C: 100 partitions, RSS

start_broker C 1000
topic=bench-rss-100p
log "qanat: 100-partition RSS check"
if "$QANAT_BIN" topics create "$topic" --partitions 100 --bootstrap "$BROKER_ADDR" >"$TMP/logs/$topic.create" 2>&1; then
  run_client "produce-$topic" kafka-produce --bootstrap "$BROKER_ADDR" --topic "$topic" \
    --partitions 100 --record-size 1024 --count "${MAX_COUNT[1024]}" --acks 1 --max-secs "$PRODUCE_SECS" || true
  rj=$OUT
  log "  100p produce: $rj"
  SUMMARY+=("- 100-partition topic (1 KiB records, acks=1, fsync every 1000 ms): $(j .records "$rj") records at $(fmt_mb "$(j .mb_per_s "$rj")") MB/s, p50/p99/p99.9 $(fmt_lat "$rj") ms")
else
  FAILURES+=("topics create $topic: $(tail -n 5 "$TMP/logs/$topic.create")")
fi
stop_broker "Qanat broker C (one 100-partition topic)"

fi # BENCH_SKIP_QANAT

# ---------------------------------------------------------------------------------------------
# Qanat, broker D: PLAINTEXT and SASL_SSL side by side

if [[ "${BENCH_SKIP_TLS:-0}" != 1 ]]; then
  command -v openssl >/dev/null || die "openssl is required for the SASL_SSL rows"
  TLSD="$TMP/D"
  mkdir -p "$TLSD/data"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=qanat bench CA" \
    -keyout "$TLSD/ca.key" -out "$TLSD/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$TLSD/server.key" -out "$TLSD/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$TLSD/san.ext"
  openssl x509 -req -in "$TLSD/server.csr" -CA "$TLSD/ca.pem" -CAkey "$TLSD/ca.key" \
    -CAcreateserial -days 2 -extfile "$TLSD/san.ext" -out "$TLSD/server.pem" 2>/dev/null
  QANAT_USER_PASSWORD=bench-password "$QANAT_BIN" users --data-dir "$TLSD/data" add bench \
    --mechanism SCRAM-SHA-512 >/dev/null
  start_broker D 1000 "$(printf '[tls]\ncert_file = "%s"\nkey_file = "%s"\n[[broker.listener]]\nname = "SECURE"\naddress = "127.0.0.1:0"\nsecurity_protocol = "SASL_SSL"' \
    "$TLSD/server.pem" "$TLSD/server.key")"
  SECURE_ADDR=$(wait_line "$BROKER_DIR/stdout" "qanat listener SECURE (SASL_SSL) listening on " "$BROKER_PID") ||
    die "broker D printed no SASL_SSL listener"
  SEC_PROPS=(--property security.protocol=SASL_SSL --property sasl.mechanism=SCRAM-SHA-512
    --property sasl.username=bench --property sasl.password=bench-password
    --property "ssl.ca.location=$TLSD/ca.pem")
  TLS_CPU=()
  for proto in PLAINTEXT SASL_SSL; do
    for client in librdkafka native; do
      topic="bench-1024b-1p-${proto,,}-$client"
      addr=$BROKER_ADDR props=()
      if [[ $proto == SASL_SSL ]]; then addr=$SECURE_ADDR props=("${SEC_PROPS[@]}"); fi
      pj="" cj="" note=""
      log "qanat D: $topic over $proto ($client): produce 1 KiB for up to ${PRODUCE_SECS}s, acks=1"
      bcpu0=$(cpu_secs "$BROKER_PID")
      run_client "produce-$topic" kafka-produce --client "$client" --bootstrap "$addr" --topic "$topic" \
        --partitions 1 --record-size 1024 --count "${MAX_COUNT[1024]}" --acks 1 --max-secs "$PRODUCE_SECS" \
        "${props[@]}" || note="produce FAILED"
      pj=$OUT
      bcpu=$(awk -v a="$bcpu0" -v b="$(cpu_secs "$BROKER_PID")" 'BEGIN { printf "%.2f", b - a }')
      log "  produce: $pj (broker CPU ${bcpu} s)"
      PRODUCE_MBPS["$proto/$client"]=$(j .mb_per_s "$pj")
      pbytes=$(j .bytes "$pj") ccpu=$(j .cpu_secs "$pj")
      if [[ -n "$pbytes" && "$pbytes" -gt 0 ]]; then
        TLS_CPU+=("- $proto produce ($client client) CPU per GB of record values: broker $(awk -v c="$bcpu" -v b="$pbytes" 'BEGIN { printf "%.2f", c / (b / 1e9) }') s, client (qanat-bench, $client) $(awk -v c="$ccpu" -v b="$pbytes" 'BEGIN { if (c == "") print "-"; else printf "%.2f", c / (b / 1e9) }') s (broker ${bcpu} s, client ${ccpu:-?} s for $(awk -v b="$pbytes" 'BEGIN { printf "%.2f", b / 1e9 }') GB)")
      fi
      n=$(j .records "$pj")
      if [[ -n "$n" && "$n" -gt 0 ]]; then
        run_client "consume-$topic" kafka-consume --bootstrap "$addr" --topic "$topic" --partitions 1 \
          --count "$n" "${props[@]}" || note="${note:+$note, }consume FAILED"
        cj=$OUT
        log "  consume: $cj"
      fi
      add_row "qanat $proto ($client producer)" 1024 1 "acks=1 / fsync every 1000 ms" "$pj" "$cj" "$note"
    done
  done
  SUMMARY+=("${TLS_CPU[@]}")
  for client in librdkafka native; do
    if [[ -n "${PRODUCE_MBPS[PLAINTEXT/$client]:-}" && -n "${PRODUCE_MBPS[SASL_SSL/$client]:-}" ]]; then
      SUMMARY+=("- TLS cost (broker D, 1 KiB, 1 partition, acks=1, $client producer): SASL_SSL produce is $(awk -v t="${PRODUCE_MBPS[SASL_SSL/$client]}" -v p="${PRODUCE_MBPS[PLAINTEXT/$client]}" 'BEGIN { printf "%.0f%%", 100 * (1 - t / p) }') below PLAINTEXT (target: at most 25%)")
    fi
  done
  stop_broker "Qanat broker D (PLAINTEXT and SASL_SSL listeners)"
fi

# ---------------------------------------------------------------------------------------------
# NATS JetStream peer

nats_up() { (exec 3<>"/dev/tcp/${NATS_SERVER%:*}/${NATS_SERVER##*:}") 2>/dev/null; }
if [[ "${BENCH_SKIP_NATS:-0}" != 1 ]]; then
  if ! nats_up && [[ -x /usr/sbin/nats-server ]] && command -v start-stop-daemon >/dev/null; then
    log "NATS not reachable on $NATS_SERVER; starting nats-server"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
      -a 127.0.0.1 -p "${NATS_SERVER##*:}" -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
    for _ in $(seq 50); do nats_up && break; sleep 0.1; done
  fi
fi
if [[ "${BENCH_SKIP_NATS:-0}" != 1 ]] && nats_up; then
  NATS_PID=$(pidof nats-server | awk '{ print $1 }' || true)
  NATS_CPU0=0
  if [[ -n "$NATS_PID" ]]; then
    # reset the peak-RSS watermark so VmHWM covers only this benchmark (needs permission)
    echo 5 >"/proc/$NATS_PID/clear_refs" 2>/dev/null && NATS_HWM_RESET=1 || NATS_HWM_RESET=0
    NATS_RSS0=$(vm_rss_kb "$NATS_PID")
    NATS_CPU0=$(cpu_secs "$NATS_PID")
  fi
  NFLABEL="async acks (window 4096) / server default sync"
  for size in 100 1024; do
    for parts in 1 8; do
      st="qanat_bench_${size}b_${parts}s"
      NATS_STREAMS+=("$st")
      pj="" cj="" note=""
      log "nats: stream $st: publish ${size} B for up to ${PRODUCE_SECS}s"
      run_client "nats-produce-$st" nats-produce --server "$NATS_SERVER" --stream "$st" \
        --subjects "$parts" --record-size "$size" --count "${MAX_COUNT[$size]}" --ack-mode async \
        --max-secs "$PRODUCE_SECS" || note="produce FAILED"
      pj=$OUT
      log "  produce: $pj"
      n=$(j .records "$pj")
      if [[ -n "$n" && "$n" -gt 0 ]]; then
        run_client "nats-consume-$st" nats-consume --server "$NATS_SERVER" --stream "$st" \
          --count "$n" --delete || note="${note:+$note, }consume FAILED"
        cj=$OUT
        log "  consume: $cj"
      fi
      timeout 30 "$BENCH_BIN" nats-delete-stream --server "$NATS_SERVER" --stream "$st" >/dev/null 2>&1 || true
      add_row "NATS JetStream" "$size" "$parts" "$NFLABEL" "$pj" "$cj" "$note"
    done
  done
  NMAX=$(j .records_per_s "$(tail -n1 "$TMP/logs/nats-produce-qanat_bench_1024b_1s.out" 2>/dev/null || true)")
  if [[ -n "$NMAX" ]] && awk -v r="$NMAX" 'BEGIN { exit !(r >= 2) }'; then
    NRATE=$(awk -v r="$NMAX" 'BEGIN { printf "%d", r / 2 }')
    # JetStream, then Qanat at the peer's rate (a fresh broker E each round): the two latency
    # rows compare at the same offered load, alternating so the machine's moods fall on both.
    for round in $(seq "$LAT_ROUNDS"); do
      tag=""
      [[ "$LAT_ROUNDS" -gt 1 ]] && tag=", round $round"
      st=qanat_bench_latency_$round
      NATS_STREAMS+=("$st")
      log "nats: latency run at $NRATE msg/s (half of $NMAX)$tag"
      run_client "nats-produce-$st" nats-produce --server "$NATS_SERVER" --stream "$st" --subjects 1 \
        --record-size 1024 --count "$(awk -v r="$NRATE" -v t="$LAT_SECS" 'BEGIN { printf "%d", r * t }')" \
        --ack-mode async --rate "$NRATE" --max-secs "$(awk -v t="$LAT_SECS" 'BEGIN { print t + 5 }')" || true
      lj=$OUT
      log "  latency: $lj"
      timeout 30 "$BENCH_BIN" nats-delete-stream --server "$NATS_SERVER" --stream "$st" >/dev/null 2>&1 || true
      add_row "NATS JetStream (latency @ $NRATE msg/s$tag)" 1024 1 "$NFLABEL" "$lj" "" "paced"
      start_broker "E$round" 1000
      qanat_latency_row "$NRATE" "JetStream's half-max rate$tag"
      stop_broker "Qanat broker E (fsync every 1000 ms; latency at JetStream's half-max rate$tag)"
    done
  fi
  if [[ -n "$NATS_PID" ]] && kill -0 "$NATS_PID" 2>/dev/null; then
    ncpu=$(awk -v a="$NATS_CPU0" -v b="$(cpu_secs "$NATS_PID")" 'BEGIN { printf "%.2f", b - a }')
    if [[ "$NATS_HWM_RESET" == 1 ]]; then
      hw="peak RSS during the NATS runs (VmHWM reset first) $(mib "$(vm_hwm_kb "$NATS_PID")")"
    else
      hw="VmHWM since server start $(mib "$(vm_hwm_kb "$NATS_PID")") (could not reset)"
    fi
    SUMMARY+=("- nats-server (pid $NATS_PID, $(nats-server --version 2>/dev/null || echo '?')): $hw, RSS before $(mib "$NATS_RSS0"), CPU ${ncpu} s user+sys during the NATS runs")
  else
    SUMMARY+=("- nats-server: RSS not measurable (pid not found)")
  fi
else
  log "NATS JetStream not reachable on $NATS_SERVER (or BENCH_SKIP_NATS=1); skipping the peer"
  SUMMARY+=("- NATS JetStream peer skipped (not reachable on $NATS_SERVER)")
fi

# ---------------------------------------------------------------------------------------------
# report

echo "| system | record size | partitions | acks/fsync | produce MB/s | produce rec/s | consume MB/s | consume rec/s | p50/p99/p99.9 ms |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "Produce as % of disk bandwidth (${DISK_MBPS} MB/s):"
for key in 100/1/1 100/8/1 1024/1/1 1024/8/1 100/1/all 100/8/all 1024/1/all 1024/8/all; do
  v=${PRODUCE_MBPS[$key]:-}
  IFS=/ read -r sz pt ak <<<"$key"
  if [[ -n "$v" ]]; then
    echo "- qanat ${sz} B, ${pt} partition(s), acks=${ak}: $(awk -v a="$v" -v d="$DISK_MBPS" 'BEGIN { printf "%.0f%%", 100 * a / d }')"
  fi
done
echo
echo "Machine: $(machine_summary)"
echo
echo "Resources:"
printf '%s\n' "${SUMMARY[@]}"
echo
echo "Notes: MB = 10^6 bytes of record values (keys/headers/framing not counted). Throughput rows"
echo "produce open-loop for up to ${PRODUCE_SECS} s (librdkafka linger.ms=5, batch.size=1 MiB, 32 MiB client buffer, no compression;"
echo "keyless records spread over the partitions as Kafka's clients do by default: sticky, a batch's worth"
echo "to one partition, then another; JetStream: 4096 publishes awaiting acks), so their latency columns include client-side queueing"
echo "at saturation; the 'latency @' rows are paced at half the max rate of the 1 KiB / 1 partition run,
with linger.ms=1 for Qanat (a latency-oriented producer setting). A latency row's rec/s column is the"
echo "rate reached, its label the rate asked: a client that cannot keep pace measures its own queueing."
echo "The native producer's latency runs from its send to the delivery report (acks=all, one broker)."
echo "Consume reads the produced records back from offset 0 (Kafka: assigned partitions, no group;"
echo "JetStream: pull consumer, AckPolicy::None). NATS JetStream runs with the server's own defaults"
echo "(file storage, no fsync per message). BENCH_SCALE=${SCALE}."

if [[ ${#FAILURES[@]} -gt 0 ]]; then
  echo
  echo "Failures:"
  for f in "${FAILURES[@]}"; do
    echo '```'
    echo "$f"
    echo '```'
  done
fi
for d in "${BROKER_LOGS[@]}"; do
  echo
  echo "Broker stderr ($(basename "$d"), last 30 lines):"
  echo '```'
  tail -n 30 "$d/stderr" 2>/dev/null || true
  echo '```'
done
