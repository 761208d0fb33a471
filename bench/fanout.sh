#!/usr/bin/env bash
# bench/fanout.sh — fan-out benchmark of the Qanat broker (A6): one producer and N consumer
# groups (N = 1, 4, 16) tailing the same topic, a catch-up run, and a rebalance after a member
# dies.
#
# What it does:
#   1. builds `qanat` and `qanat-bench` (release);
#   2. starts a broker (`[storage] fsync = 1000`, `[groups]` initial rebalance delay 100 ms);
#   3. solo: one producer (1 KiB records, acks=1, open loop) writes a fresh topic of 4
#      partitions for FANOUT_SECS, no reader: the producer's solo rate;
#   4. tailing, for each N: a fresh topic of the same shape; N consumers, each in its own group
#      (`qanat-bench kafka-consume --group`, subscribe from earliest, auto-commit), join and are
#      assigned while the topic is still empty; only then does the same producer write it for
#      FANOUT_SECS. So every group tails the topic: it reads what is written as it is written,
#      never a backlog. Once the producer is done, each reader is told (`--stop-file`) how many
#      records there are and stops when it has read them all, or DRAIN_SECS after the
#      producer's end if it is that far behind; its rate is over its first to its last record;
#      aggregate read = the sum of the N readers' rates;
#   5. catch-up (FANOUT_CATCHUP_GROUPS, default the largest N; "" skips it): the same as 4 on
#      the solo run's topic instead, so the readers start as far behind as the solo run wrote
#      (its MB are in the row) and catch up while the producer writes;
#   6. rebalance: three members of one group (session.timeout.ms = RB_SESSION_MS) on a
#      six-partition topic; one is SIGKILLed; time from the kill to the moment both survivors
#      report their new assignment (librdkafka's rebalance callback, epoch ms).
# Output: one markdown table on stdout plus summary lines; progress on stderr.
#
# Per row: the producer's rate and its share of the solo rate; the aggregate read rate and
# read / write; whether every reader read every record within DRAIN_SECS of the producer's
# end (else the fewest read); readers' lag at the end, as the time from the producer's end
# (its process exit, after its last delivery report) to the last reader's last record: a
# reader that kept up gets its last record within a fetch wait of the end (negative = before
# the producer exited), one that fell behind needs its lag's worth of reading after it.
#
# Env:  BENCH_SCALE   (default 1) multiplies durations; 0.25 = quick run.
#       BENCH_TMPDIR  (default /tmp) parent of the temp dir (data dir lives there).
#       FANOUT_GROUPS (default "1 4 16") the N values of the tailing runs.
#       FANOUT_CATCHUP_GROUPS (default the largest of FANOUT_GROUPS) N of the catch-up run.
#       FANOUT_READER_NICE (default 0) runs the reader processes under `nice -n` this value: on
#                     a small machine the N client processes compete with the producer and the
#                     broker for CPU; 19 approximates readers on other hosts.
#       FANOUT_READER_IDLE (default 0) 1 runs the readers under SCHED_IDLE (`chrt --idle 0`):
#                     they run only on CPU nothing else wants, a closer stand-in for readers
#                     on other hosts than nice 19, which still takes a share of a busy CPU;
#                     with FANOUT_READER_CGROUP=1 and FANOUT_READER_NICE=19 as well, the
#                     nearest this script has.
#       FANOUT_READER_CGROUP (default 0) 1 puts the readers (and the control's busy loops) in
#                     one CPU cgroup at the lowest weight: N readers then weigh together what
#                     one task of that weight does, as readers on other hosts would, where
#                     under `nice` alone each is weighed on its own and 16 readers take 16
#                     times the share of one (needs root and a cgroup cpu controller).
#       FANOUT_READER_PROPERTIES (default none) librdkafka properties KEY=VALUE, separated by
#                     spaces, for every tailing and catch-up reader (`--property`); they
#                     override the readers' throughput settings (10 MiB per partition per
#                     fetch, so ~40 MiB responses, and 256 MiB queued), e.g.
#                     "max.partition.fetch.bytes=1048576 queued.max.messages.kbytes=65536"
#                     for librdkafka's own defaults.
#       FANOUT_CONTROL (default 1) also runs the solo producer beside one busy loop per core,
#                     scheduled as the readers are (FANOUT_READER_NICE / _IDLE / _CGROUP): what work at
#                     that priority costs the producer on this machine when the broker does
#                     nothing for it; 0 skips it.
#       FANOUT_ROUNDS (default 1) rounds of the solo run and the tailing runs in turn, each on
#                     fresh topics (the previous round's are deleted, so the disk holds one
#                     round's data); each row is one round's, against that round's solo rate,
#                     and a line per N gives the median over rounds of that share, in which
#                     the solo rate's drift from run to run cancels.
#       BENCH_QANAT_BIN: a broker binary to measure instead of this tree's (A/B comparisons;
#                     the clients stay this tree's qanat-bench).
# Broker CPU per GB served: the broker's utime+stime over each N run (readers started to last
# reader done), less the solo run's CPU per GB produced times what was produced meanwhile,
# over the bytes the readers received (record values).
# Fetch responses per second and bytes per response, over the same window, come from the
# broker's Prometheus counters (`qanat_request_seconds_count{api="Fetch"}`,
# `qanat_fetch_response_bytes_total`): small responses mean many wake-ups and syscalls per GB.
# The window includes the readers' drain after the producer's end.
# All traffic goes to 127.0.0.1. Every client run is under `timeout`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${BENCH_SCALE:-1}
GROUP_COUNTS=${FANOUT_GROUPS:-"1 4 16"}
CATCHUP_GROUPS=${FANOUT_CATCHUP_GROUPS-$(tr ' ' '\n' <<<"$GROUP_COUNTS" | sort -n | tail -n1)}
READER_NICE=${FANOUT_READER_NICE:-0}
READER_SCHED=()
[[ "${FANOUT_READER_IDLE:-0}" = 1 ]] && READER_SCHED=(chrt --idle 0)
READER_CG=
ROUNDS=${FANOUT_ROUNDS:-1}
CLIENT_TIMEOUT=300
PARTS=4
RB_SESSION_MS=3000

BENCH_TAG=fanout
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
command -v jq >/dev/null || die "jq is required (apt-get install jq)"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "FANOUT_ROUNDS must be a whole number of rounds, 1 or more (got '$ROUNDS')"
command -v curl >/dev/null || die "curl is required"
READER_PROPS=()
for kv in ${FANOUT_READER_PROPERTIES:-}; do
  [[ $kv == ?*=* ]] || die "FANOUT_READER_PROPERTIES takes KEY=VALUE words (got '$kv')"
  READER_PROPS+=(--property "$kv")
done
sf() { awk -v b="$1" -v k="$SCALE" -v m="${2:-1}" 'BEGIN { v = b * k; if (v < m) v = m; printf "%.2f", v }'; }
SECS=$(sf 8 2)
DRAIN_SECS=$(sf 10 5)
MAX_COUNT=100000000

start_tmp qanat-fanout
# lowest_cpu_cgroup NAME: make a CPU cgroup NAME at the lowest weight (cgroup v2 `cpu.weight`
# 1, or v1 `cpu.shares` 2) and print its directory.
lowest_cpu_cgroup() {
  local v2=/sys/fs/cgroup dir
  if grep -qw cpu "$v2/cgroup.controllers" 2>/dev/null; then
    grep -qw cpu "$v2/cgroup.subtree_control" || echo +cpu >"$v2/cgroup.subtree_control" || return 1
    dir=$v2/$1
    mkdir "$dir" || return 1
    echo 1 >"$dir/cpu.weight" || { rmdir "$dir"; return 1; }
  elif [[ -f /sys/fs/cgroup/cpu/cpu.shares ]]; then
    dir=/sys/fs/cgroup/cpu/$1
    mkdir "$dir" || return 1
    echo 2 >"$dir/cpu.shares" || { rmdir "$dir"; return 1; }
  else
    return 1
  fi
  echo "$dir"
}
cleanup_extra() { [[ -z "$READER_CG" ]] || rmdir "$READER_CG" 2>/dev/null || true; }
if [[ "${FANOUT_READER_CGROUP:-0}" = 1 ]]; then
  READER_CG=$(lowest_cpu_cgroup "qanat-fanout-readers.$$") ||
    die "FANOUT_READER_CGROUP=1 needs root and a cgroup cpu controller (v1 or v2)"
  READER_SCHED+=(bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$READER_CG")
fi
READERS_AS="nice $READER_NICE"
[[ "${FANOUT_READER_IDLE:-0}" = 1 ]] && READERS_AS+=", SCHED_IDLE"
[[ -n "$READER_CG" ]] && READERS_AS+=", one lowest-weight cgroup"
mkdir -p "$TMP/logs" "$TMP/data"
log "temp dir $TMP, BENCH_SCALE=$SCALE, ${SECS}s per run"
machine_start

build_release qanat qanat-bench
broker_under_test

# ---------------------------------------------------------------------------------------------
# broker

printf '[storage]\nfsync = 1000\n[groups]\ninitial_rebalance_delay_ms = 100\nmin_session_timeout_ms = 1000\n' \
  >"$TMP/qanat.toml"
"$QANAT_BIN" broker --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir "$TMP/data" \
  --config "$TMP/qanat.toml" >"$TMP/broker.stdout" 2>"$TMP/broker.stderr" &
BROKER_PID=$!
PIDS+=("$BROKER_PID")
ADDR=$(wait_line "$TMP/broker.stdout" "qanat broker listening on " "$BROKER_PID") ||
  { cat "$TMP/broker.stderr" >&2; die "broker did not start"; }
log "broker pid $BROKER_PID on $ADDR"
METRICS_ADDR=$(wait_line "$TMP/broker.stdout" "qanat metrics listening on " "$BROKER_PID") ||
  die "broker did not start its metrics endpoint"
# fetch_counters: "<fetch responses> <fetch response bytes>" so far
fetch_counters() {
  curl -sf "http://$METRICS_ADDR/metrics" | awk '
    /^qanat_request_seconds_count\{.*api="Fetch"/ { n += $NF }
    /^qanat_fetch_response_bytes_total/ { b += $NF }
    END { printf "%d %d\n", n, b }'
}
"$QANAT_BIN" topics create rb --partitions 6 --bootstrap "$ADDR" >/dev/null

j() { jq -r "$1 // empty" <<<"$2" 2>/dev/null || true; }

produce() { # produce <topic> <log name> -> JSON line in OUT, epoch ms of its end in END_MS
  timeout --kill-after=10 "$CLIENT_TIMEOUT" "$BENCH_BIN" kafka-produce --bootstrap "$ADDR" \
    --topic "$1" --partitions "$PARTS" --record-size 1024 --count "$MAX_COUNT" --acks 1 \
    --max-secs "$SECS" >"$TMP/logs/$2.out" 2>"$TMP/logs/$2.err" ||
    die "producer $2 failed: $(tail -n5 "$TMP/logs/$2.err")"
  END_MS=$(date +%s%3N)
  OUT=$(tail -n1 "$TMP/logs/$2.out")
}

# wait_assigned <timeout s> <files...>: until every file has an "assigned [..]" line
wait_assigned() {
  local limit=$1
  shift
  local t0=$SECONDS f
  while :; do
    local all=1
    for f in "$@"; do grep -q 'qanat-bench: assigned \[[0-9]' "$f" 2>/dev/null || all=0; done
    [[ $all -eq 1 ]] && return 0
    ((SECONDS - t0 < limit)) || return 1
    sleep 0.05
  done
}

# ---------------------------------------------------------------------------------------------
# runs

# solo_run <round>: the producer alone on a fresh topic; sets SOLO_TOPIC, SOLO, SOLO_MB,
# SOLO_BYTES and SOLO_CPU_PER_BYTE, and adds the rate to SOLO_RATES
SOLO_RATES=()
solo_run() {
  SOLO_TOPIC=fan-solo-$1
  log "round $1: solo producer, ${SECS}s"
  "$QANAT_BIN" topics create "$SOLO_TOPIC" --partitions "$PARTS" --bootstrap "$ADDR" >/dev/null
  CPU0=$(cpu_secs "$BROKER_PID")
  produce "$SOLO_TOPIC" "solo-$1"
  CPU1=$(cpu_secs "$BROKER_PID")
  SOLO=$OUT
  SOLO_MB=$(j .mb_per_s "$SOLO")
  SOLO_BYTES=$(j .bytes "$SOLO")
  SOLO_RATES+=("$SOLO_MB")
  # broker CPU-s per byte produced, to take the produce share out of the N runs' CPU
  SOLO_CPU_PER_BYTE=$(awk -v a="$CPU0" -v b="$CPU1" -v n="$SOLO_BYTES" 'BEGIN { printf "%.6e", (b - a) / n }')
  log "solo: broker $(awk -v c="$SOLO_CPU_PER_BYTE" 'BEGIN { printf "%.2f", c * 1e9 }') CPU-s/GB produced"
  log "solo: $SOLO_MB MB/s ($(j .records "$SOLO") records)"
}
solo_run 1

CONTROL_LINE=
if [[ "${FANOUT_CONTROL:-1}" = 1 ]]; then
  log "control: solo producer beside $(nproc) busy loops scheduled as the readers are, ${SECS}s"
  "$QANAT_BIN" topics create fan-control --partitions "$PARTS" --bootstrap "$ADDR" >/dev/null
  BURNERS=()
  for _ in $(seq "$(nproc)"); do
    nice -n "$READER_NICE" "${READER_SCHED[@]}" bash -c 'while :; do :; done' &
    BURNERS+=($!)
  done
  PIDS+=("${BURNERS[@]}")
  produce fan-control control
  kill "${BURNERS[@]}" 2>/dev/null || true
  CONTROL_MB=$(j .mb_per_s "$OUT")
  CONTROL_LINE="- control: the solo producer beside $(nproc) busy loops ($READERS_AS, as the readers; no broker work for them): **$CONTROL_MB MB/s, $(awk -v a="$CONTROL_MB" -v b="$SOLO_MB" 'BEGIN { printf "%.0f%%", 100 * a / b }') of solo**: what CPU work at that priority alone costs the producer on this machine"
  log "$CONTROL_LINE"
fi

ROWS=()
declare -A KEEPS=() # N -> each round's share of solo kept while N groups tailed
ROUND=1
# fanout_run <N> <topic> <label>: N readers on <topic>, assigned before the producer writes it
fanout_run() {
  local n=$1 topic=$2 label=$3 i pid c
  log "N=$n ($label) on $topic"
  local CPIDS=() ERRS=()
  CPU0=$(cpu_secs "$BROKER_PID")
  read -r FETCH0 FBYTES0 < <(fetch_counters)
  T0_MS=$(date +%s%3N)
  for i in $(seq "$n"); do
    timeout --kill-after=10 "$CLIENT_TIMEOUT" nice -n "$READER_NICE" "${READER_SCHED[@]}" "$BENCH_BIN" kafka-consume --bootstrap "$ADDR" \
      --topic "$topic" --group "$topic-$i" --count "$MAX_COUNT" --stop-file "$TMP/stop-$topic" "${READER_PROPS[@]}" \
      >"$TMP/logs/c-$topic-$i.out" 2>"$TMP/logs/c-$topic-$i.err" &
    CPIDS+=("$!")
    PIDS+=("$!")
    ERRS+=("$TMP/logs/c-$topic-$i.err")
  done
  wait_assigned 60 "${ERRS[@]}" || die "N=$n: not every reader got an assignment within 60 s"
  produce "$topic" "p-$topic"
  WITH=$OUT
  PRODUCED=$(j .records "$WITH")
  local EXPECTED=$PRODUCED
  # the catch-up readers also read the backlog the solo run wrote
  if [[ $topic == "$SOLO_TOPIC" ]]; then EXPECTED=$((PRODUCED + $(j .records "$SOLO"))); fi
  echo "$EXPECTED $((END_MS + ${DRAIN_SECS%.*} * 1000))" >"$TMP/stop-$topic"
  for pid in "${CPIDS[@]}"; do wait "$pid" || die "a reader of N=$n failed: see $TMP/logs"; done
  CPU1=$(cpu_secs "$BROKER_PID")
  read -r FETCH1 FBYTES1 < <(fetch_counters)
  T1_MS=$(date +%s%3N)
  FETCH_RATE=$(awk -v a="$FETCH0" -v b="$FETCH1" -v t="$((T1_MS - T0_MS))" 'BEGIN { printf "%.0f", (b - a) / (t / 1000) }')
  FETCH_KB=$(awk -v a="$FETCH0" -v b="$FETCH1" -v x="$FBYTES0" -v y="$FBYTES1" \
    'BEGIN { if (b > a) printf "%.0f", (y - x) / (b - a) / 1024; else print "-" }')
  local READ_MB=0 READ_BYTES=0 ALL_READ=yes LAST_MS=0 FEWEST=$EXPECTED
  for i in $(seq "$n"); do
    c=$(tail -n1 "$TMP/logs/c-$topic-$i.out")
    READ_MB=$(awk -v a="$READ_MB" -v b="$(j .mb_per_s "$c")" 'BEGIN { printf "%.1f", a + b }')
    READ_BYTES=$((READ_BYTES + $(j .bytes "$c")))
    if (($(j .records "$c") < FEWEST)); then FEWEST=$(j .records "$c"); fi
    if (($(j .last_record_ms "$c") > LAST_MS)); then LAST_MS=$(j .last_record_ms "$c"); fi
  done
  ((FEWEST == EXPECTED)) || ALL_READ="no (fewest $FEWEST of $EXPECTED)"
  local LAG_MS=$((LAST_MS - END_MS))
  SERVE_GB=$(awk -v a="$CPU0" -v b="$CPU1" -v p="$SOLO_CPU_PER_BYTE" -v w="$(j .bytes "$WITH")" -v r="$READ_BYTES" \
    'BEGIN { s = (b - a) - p * w; if (s < 0) s = 0; if (r > 0) printf "%.2f", s / (r / 1e9); else print "-" }')
  BROKER_RUN_CPU=$(awk -v a="$CPU0" -v b="$CPU1" 'BEGIN { printf "%.1f", b - a }')
  W_MB=$(j .mb_per_s "$WITH")
  KEEP=$(awk -v a="$W_MB" -v b="$SOLO_MB" 'BEGIN { printf "%.0f", 100 * a / b }')
  RATIO=$(awk -v a="$READ_MB" -v b="$W_MB" 'BEGIN { printf "%.1f", a / b }')
  [[ $label != tailing ]] || KEEPS[$n]+=" $KEEP"
  ROWS+=("| $n | $label | $ROUND | $SOLO_MB | $W_MB | $KEEP% | $READ_MB | ${RATIO}x | $ALL_READ | $LAG_MS | $BROKER_RUN_CPU | $SERVE_GB | $FETCH_RATE | $FETCH_KB | $(cut -d' ' -f1 /proc/loadavg) |")
  log "N=$n ($label): producer $W_MB MB/s ($KEEP% of solo), aggregate read $READ_MB MB/s (${RATIO}x), all read: $ALL_READ, last record ${LAG_MS} ms after the producer's end, broker ${BROKER_RUN_CPU} CPU-s, $SERVE_GB CPU-s/GB served, $FETCH_RATE fetch responses/s of $FETCH_KB KiB"
}

for ROUND in $(seq "$ROUNDS"); do
  if ((ROUND > 1)); then
    for t in "$SOLO_TOPIC" $(printf "fan-tail-%s-$((ROUND - 1)) " $GROUP_COUNTS); do
      "$QANAT_BIN" topics delete "$t" --bootstrap "$ADDR" >/dev/null
    done
    solo_run "$ROUND"
  fi
  for n in $GROUP_COUNTS; do
    "$QANAT_BIN" topics create "fan-tail-$n-$ROUND" --partitions "$PARTS" --bootstrap "$ADDR" >/dev/null
    fanout_run "$n" "fan-tail-$n-$ROUND" tailing
  done
done
for n in $CATCHUP_GROUPS; do
  fanout_run "$n" "$SOLO_TOPIC" "catch-up, $(awk -v b="$SOLO_BYTES" 'BEGIN { printf "%.0f", b / 1e6 }') MB behind"
done

# ---------------------------------------------------------------------------------------------
# rebalance after a member dies

log "rebalance: 3 members, session.timeout.ms=$RB_SESSION_MS, SIGKILL one"
RB=()
for i in 1 2 3; do
  # Not under `timeout`: $! must be the member itself, for the SIGKILL.
  "$BENCH_BIN" kafka-consume --bootstrap "$ADDR" \
    --topic rb --group fan-rb --count "$MAX_COUNT" --idle-timeout-secs 120 \
    --session-timeout-ms "$RB_SESSION_MS" >"$TMP/logs/rb-$i.out" 2>"$TMP/logs/rb-$i.err" &
  RB+=("$!")
  PIDS+=("$!")
done
last_assigned() { grep 'qanat-bench: assigned' "$1" 2>/dev/null | tail -n1; }
REBALANCE_MS="-"
T0=$SECONDS
while :; do # until each member holds two partitions
  ok=1
  for i in 1 2 3; do last_assigned "$TMP/logs/rb-$i.err" | grep -q 'assigned \[[0-9]*, [0-9]*\]' || ok=0; done
  [[ $ok -eq 1 ]] && break
  ((SECONDS - T0 < 60)) || die "rebalance group never became stable: $(cat "$TMP"/logs/rb-*.err)"
  sleep 0.05
done
KILL_MS=$(date +%s%3N)
kill -KILL "${RB[2]}"
T0=$SECONDS
while :; do # until both survivors hold three partitions, assigned after the kill
  ok=1
  for i in 1 2; do
    line=$(last_assigned "$TMP/logs/rb-$i.err")
    at=${line##*at_ms=}
    if ! grep -q 'assigned \[[0-9]*, [0-9]*, [0-9]*\]' <<<"$line" || ((at < KILL_MS)); then ok=0; fi
  done
  if [[ $ok -eq 1 ]]; then
    a1=$(last_assigned "$TMP/logs/rb-1.err") a2=$(last_assigned "$TMP/logs/rb-2.err")
    a1=${a1##*at_ms=} a2=${a2##*at_ms=}
    REBALANCE_MS=$(((a1 > a2 ? a1 : a2) - KILL_MS))
    break
  fi
  ((SECONDS - T0 < 60)) || { log "survivors did not get the partitions within 60 s"; break; }
  sleep 0.02
done
kill -TERM "${RB[0]}" "${RB[1]}" 2>/dev/null || true
log "rebalance after SIGKILL: $REBALANCE_MS ms"

# ---------------------------------------------------------------------------------------------
# report

BROKER_CPU=$(cpu_secs "$BROKER_PID")
BROKER_HWM="$(vm_hwm_mib "$BROKER_PID") MiB"
echo "Fan-out: 1 producer (1 KiB records, acks=1, $PARTS partitions, open loop), N consumer groups of one member each, ${SECS}s runs, $ROUNDS round(s); producer solo: **${SOLO_RATES[*]} MB/s**"
echo
echo "| groups N | readers | round | solo MB/s | producer MB/s | kept (of solo) | aggregate read MB/s | read / write | every reader read all (within ${DRAIN_SECS} s) | last record after the producer's end, ms | broker CPU-s in the run | broker CPU-s/GB served | fetch responses/s | KiB per fetch response | load (1 min) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
echo
if ((ROUNDS > 1)); then
  for n in $GROUP_COUNTS; do
    keeps=$(tr ' ' '\n' <<<"${KEEPS[$n]}" | grep -v '^$' | sort -g | tr '\n' ' ')
    echo "- N=$n tailing: the producer kept a median of **$(median <<<"$keeps")%** of its own round's solo rate over $ROUNDS rounds (each: $(sed 's/ $//; s/ /%, /g' <<<"$keeps")%)"
  done
fi
[[ -n "$CONTROL_LINE" ]] && echo "$CONTROL_LINE"
echo "- rebalance after SIGKILL of 1 of 3 members (session.timeout.ms=$RB_SESSION_MS): **${REBALANCE_MS} ms** from the kill to both survivors' new assignment (target: session timeout + 1 s = $((RB_SESSION_MS + 1000)) ms)"
echo "- broker CPU-s/GB served: the run's broker CPU less $(awk -v c="$SOLO_CPU_PER_BYTE" 'BEGIN { printf "%.2f", c * 1e9 }') CPU-s/GB (solo) for what was produced meanwhile, over the record bytes the readers received"
echo "- broker ($QANAT_BIN): CPU ${BROKER_CPU} s user+sys, peak RSS $BROKER_HWM; machine: $(machine_summary)"
echo "- every process (broker, producer, readers) shares the same $(nproc) cores: with many readers the producer competes with them for CPU; the readers ran at $READERS_AS${FANOUT_READER_PROPERTIES:+, with $FANOUT_READER_PROPERTIES}"
if grep -qiE 'error|panic' "$TMP/broker.stderr"; then
  echo "- broker stderr has errors:"
  grep -iE 'error|panic' "$TMP/broker.stderr" | head -n 10 | sed 's/^/    /'
fi
