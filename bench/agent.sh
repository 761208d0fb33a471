#!/usr/bin/env bash
# bench/agent.sh — file-to-broker benchmark of `qanat agent`, with rsyslog (imfile -> omkafka)
# shipping the same file to the same broker as the peer.
#
# What it does:
#   1. builds `qanat` (release); installs Debian `rsyslog` + `rsyslog-kafka` if missing;
#   2. writes one file of 200-byte lines (2 GB x BENCH_SCALE) and starts a Qanat broker;
#   3. qanat agent, once with its native producer and once with librdkafka: reads the file from
#      the start to the broker (lz4, 512 KiB batches, acks=all, idempotent); done when every
#      line is acknowledged (agent metrics) -> lines/s, MB/s, CPU seconds per GB (utime+stime
#      of the agent), peak RSS (VmHWM);
#   4. rsyslog: its own rsyslogd instance (own config, pid file and work dir, not the system
#      one) with imfile -> omkafka (lz4, the same batch size) to another topic of the same
#      broker; done when the topic holds every line -> the same columns;
#   5. qanat agent tailing 1,000 files (100 lines each, then 5 rounds of appends): RSS.
# Output: one markdown table on stdout; progress on stderr.
#
# Env:  BENCH_SCALE   (default 1) multiplies the file size; 0.05 = a quick run.
#       BENCH_TMPDIR  (default /tmp) parent of the temp dir.
#       BENCH_SKIP_RSYSLOG=1 skips the peer.
#       BENCH_QANAT_BIN=path measures that binary instead of building the release one.
#       BENCH_AGENT_PRODUCERS (default "native librdkafka") the agent's producers to run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${BENCH_SCALE:-1}
LINE_BYTES=200
TIMEOUT=900 # seconds, cap for any single run

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
command -v curl >/dev/null || die "curl is required"
command -v python3 >/dev/null || die "python3 is required"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi
}

start_tmp qanat-agent-bench
log "temp dir $TMP, BENCH_SCALE=$SCALE"

if [ -n "${BENCH_QANAT_BIN:-}" ]; then
  QANAT=$BENCH_QANAT_BIN # measure another build (e.g. a debug one) without building
else
  build_release qanat
  QANAT="$QANAT_BIN"
fi

if [ -z "${BENCH_SKIP_RSYSLOG:-}" ]; then
  if ! command -v rsyslogd >/dev/null || [ ! -e /usr/lib/x86_64-linux-gnu/rsyslog/omkafka.so ] &&
    ! ls /usr/lib/*/rsyslog/omkafka.so >/dev/null 2>&1; then
    log "installing rsyslog rsyslog-kafka"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      rsyslog rsyslog-kafka </dev/null >&2
  fi
fi

# ---------------------------------------------------------------------------------------------
# helpers

# VmRSS in MiB
rss_of() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
now() { date +%s.%N; }
# latest offset of partition 0 of a topic (0 if it does not exist)
latest() {
  "$QANAT" topics describe "$1" --bootstrap "$BROKER" 2>/dev/null |
    awk '/partition 0/ { for (i = 1; i <= NF; i++) if ($i == "latest") print $(i + 1) }' | head -1 |
    grep . || echo 0
}
# sum of an agent counter from its metrics endpoint
metric() { curl -s "http://$1/metrics" | awk -v m="$2" '$1 ~ "^"m"({|$)" { s += $2 } END { printf "%d", s }'; }
# wait until a line starting with $2 appears in file $1; print the rest

# ---------------------------------------------------------------------------------------------
# data

TOTAL_BYTES=$(awk -v s="$SCALE" 'BEGIN { printf "%d", 2e9 * s }')
LINES=$((TOTAL_BYTES / LINE_BYTES))
log "writing $LINES lines of $LINE_BYTES bytes ($TOTAL_BYTES bytes)"
mkdir -p "$TMP/logs"
python3 - "$TMP/logs/bench.log" "$LINES" "$LINE_BYTES" <<'PY'
import random, sys
path, lines, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(7)
words = ["GET", "POST", "/api/v1/orders", "/static/app.js", "200", "404", "user=", "ms", "ok",
         "checkout", "cart", "session", "trace", "INFO", "WARN", "latency"]
block_lines = 40000  # one 8 MB block of distinct lines, repeated (lz4's window is 64 KB)
block = []
for i in range(block_lines):
    head = "2026-01-01T00:00:00.%06dZ %09d " % (rnd.randrange(10**6), i)
    body = " ".join(rnd.choice(words) + str(rnd.randrange(1000)) for _ in range(40))
    line = (head + body)[: width - 1]
    block.append(line.ljust(width - 1, ".") + "\n")
data = "".join(block).encode()
with open(path, "wb") as f:
    n = 0
    while n < lines:
        k = min(block_lines, lines - n)
        f.write(data if k == block_lines else data[: k * width])
        n += k
PY
FILE_BYTES=$(stat -c %s "$TMP/logs/bench.log")

mkdir -p "$TMP/broker"
"$QANAT" broker --data-dir "$TMP/broker/data" --listen 127.0.0.1:0 >"$TMP/broker/out" 2>"$TMP/broker/err" &
PIDS+=($!)
BROKER=$(wait_line "$TMP/broker/out" "qanat broker listening on ") ||
  die "no 'qanat broker listening on' line in $TMP/broker/out"
log "broker on $BROKER"

# ---------------------------------------------------------------------------------------------
# qanat agent, one big file

run_agent() { # name glob lines [producer] -> sets A_SECS A_CPU A_HWM A_PID
  local name=$1 glob=$2 want=$3 producer=${4:-native}
  mkdir -p "$TMP/$name"
  cat >"$TMP/$name/agent.toml" <<TOML
host = "bench"
checkpoint_dir = "$TMP/$name/state"
manifest_topic = "bench-manifest"
[output]
producer = "$producer"
bootstrap = "$BROKER"
compression = "lz4"
[[source]]
paths = ["$glob"]
topic = "$name"
TOML
  local t0
  t0=$(now)
  "$QANAT" agent --config "$TMP/$name/agent.toml" --metrics-listen 127.0.0.1:0 \
    >"$TMP/$name/out" 2>"$TMP/$name/err" &
  A_PID=$!
  PIDS+=("$A_PID")
  A_METRICS=$(wait_line "$TMP/$name/out" "qanat metrics listening on ") ||
  die "no 'qanat metrics listening on' line in $TMP/$name/out"
  local deadline=$((SECONDS + TIMEOUT))
  while [ "$(metric "$A_METRICS" qanat_agent_lines_acked_total)" -lt "$want" ]; do
    [ $SECONDS -lt $deadline ] || die "$name: not all lines acknowledged within ${TIMEOUT}s"
    kill -0 "$A_PID" 2>/dev/null || die "$name: agent exited: $(tail -5 "$TMP/$name/err")"
    sleep 0.05
  done
  A_SECS=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
  A_CPU=$(cpu_secs "$A_PID")
  A_HWM=$(vm_hwm_mib "$A_PID")
}

declare -A AG_SECS AG_CPU AG_HWM
PRODUCERS=${BENCH_AGENT_PRODUCERS:-native librdkafka}
for producer in $PRODUCERS; do
  log "qanat agent ($producer): $LINES lines"
  run_agent "agent-$producer" "$TMP/logs/bench.log" "$LINES" "$producer"
  AG_SECS[$producer]=$A_SECS AG_CPU[$producer]=$A_CPU AG_HWM[$producer]=$A_HWM
  kill -TERM "$A_PID"; wait "$A_PID" || true
  [ "$(latest "agent-$producer")" -ge "$LINES" ] ||
    die "agent-$producer topic holds $(latest "agent-$producer") records, expected >= $LINES"
  log "qanat agent ($producer): ${A_SECS}s, cpu ${A_CPU}s, peak RSS ${A_HWM} MiB"
done

# ---------------------------------------------------------------------------------------------
# rsyslog, same file, same broker

RS_SECS=- RS_CPU=- RS_HWM=-
if [ -z "${BENCH_SKIP_RSYSLOG:-}" ]; then
  log "rsyslog (imfile -> omkafka): $LINES lines"
  mkdir -p "$TMP/rsyslog/work"
  cat >"$TMP/rsyslog/rsyslog.conf" <<CONF
global(workDirectory="$TMP/rsyslog/work" maxMessageSize="8k")
module(load="imfile" mode="inotify")
module(load="omkafka")
template(name="raw" type="string" string="%msg%")
input(type="imfile" file="$TMP/logs/bench.log" tag="bench" ruleset="tokafka"
      freshStartTail="off" reopenOnTruncate="on")
ruleset(name="tokafka" queue.type="LinkedList" queue.size="200000" queue.dequeueBatchSize="4096") {
  action(type="omkafka" broker=["$BROKER"] topic="rsyslog" template="raw"
         partitions.auto="on"
         confParam=["compression.codec=lz4", "batch.size=524288", "linger.ms=200",
                    "queue.buffering.max.messages=1000000"])
}
CONF
  t0=$(now)
  rsyslogd -n -f "$TMP/rsyslog/rsyslog.conf" -i "$TMP/rsyslog/rsyslogd.pid" \
    >"$TMP/rsyslog/out" 2>"$TMP/rsyslog/err" &
  RS_PID=$!
  PIDS+=("$RS_PID")
  deadline=$((SECONDS + TIMEOUT))
  while [ "$(latest rsyslog)" -lt "$LINES" ]; do
    if [ $SECONDS -ge $deadline ]; then
      log "rsyslog: only $(latest rsyslog) of $LINES lines within ${TIMEOUT}s"
      break
    fi
    kill -0 "$RS_PID" 2>/dev/null || die "rsyslogd exited: $(tail -5 "$TMP/rsyslog/err")"
    sleep 0.2
  done
  RS_SECS=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
  RS_CPU=$(cpu_secs "$RS_PID")
  RS_HWM=$(vm_hwm_mib "$RS_PID")
  RS_LINES=$(latest rsyslog)
  kill -TERM "$RS_PID"; wait "$RS_PID" || true
  log "rsyslog: ${RS_SECS}s, cpu ${RS_CPU}s, peak RSS ${RS_HWM} MiB, $RS_LINES lines"
fi

# ---------------------------------------------------------------------------------------------
# qanat agent tailing 1,000 files

log "qanat agent: 1000 files"
mkdir -p "$TMP/many"
python3 - "$TMP/many" <<'PY'
import sys
d = sys.argv[1]
for i in range(1000):
    with open(f"{d}/f{i:04d}.log", "w") as f:
        f.writelines(f"file {i} line {j} " + "x" * 170 + "\n" for j in range(100))
PY
run_agent many "$TMP/many/*.log" 100000
for round in 1 2 3 4 5; do
  python3 - "$TMP/many" "$round" <<'PY'
import sys
d, r = sys.argv[1], sys.argv[2]
for i in range(1000):
    with open(f"{d}/f{i:04d}.log", "a") as f:
        f.write(f"file {i} append round {r} " + "y" * 160 + "\n")
PY
  want=$((100000 + 1000 * round))
  while [ "$(metric "$A_METRICS" qanat_agent_lines_acked_total)" -lt "$want" ]; do sleep 0.1; done
done
MANY_RSS=$(rss_of "$A_PID")
MANY_HWM=$(vm_hwm_mib "$A_PID")
MANY_FILES=$(metric "$A_METRICS" qanat_agent_files_tracked)
kill -TERM "$A_PID"; wait "$A_PID" || true

# ---------------------------------------------------------------------------------------------
# table

row() { # name secs cpu hwm
  awk -v n="$1" -v s="$2" -v c="$3" -v h="$4" -v l="$LINES" -v b="$FILE_BYTES" 'BEGIN {
    if (s == "-") { printf "| %s | - | - | - | - | - |\n", n; exit }
    printf "| %s | %.0f | %.1f | %.2f | %.2f | %s |\n", n, l / s, b / s / 1e6, c, c / (b / 1e9), h }'
}
echo
echo "File to broker: $LINES lines x $LINE_BYTES B = $(awk -v b="$FILE_BYTES" 'BEGIN { printf "%.2f", b / 1e9 }') GB, lz4, 512 KiB batches, one core-pair machine ($(nproc) CPUs)"
echo
echo "| collector | lines/s | MB/s | CPU s | CPU s/GB | peak RSS MiB |"
echo "| --- | --- | --- | --- | --- | --- |"
for producer in $PRODUCERS; do
  row "qanat agent ($producer producer)" "${AG_SECS[$producer]}" "${AG_CPU[$producer]}" "${AG_HWM[$producer]}"
done
row "rsyslog imfile→omkafka" "$RS_SECS" "$RS_CPU" "$RS_HWM"
echo
echo "| qanat agent tailing | files | RSS MiB | peak RSS MiB |"
echo "| --- | --- | --- | --- |"
echo "| 1,000 files, 100 lines + 5 appends each | $MANY_FILES | $MANY_RSS | $MANY_HWM |"
