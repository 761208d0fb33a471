#!/usr/bin/env bash
# bench/collect.sh — throughput / latency / CPU / memory of `qanat collect` under wrk, with the
# Qanat broker on the same machine (everything on 127.0.0.1).
#
# What it does:
#   1. builds `qanat` (release); installs Debian `wrk` when missing;
#   2. starts a broker (temp data dir) and a collector routing beacons and app events to two
#      topics (one librdkafka producer per route);
#   3. wrk, GET /t.gif beacons (a page view with SPM, screen, language, browser user agent);
#   4. wrk, POST /v1/events batches of 50 events (page views, clicks, custom events);
#   5. after each run, waits until the broker has acknowledged every accepted event.
# Output: one markdown table on stdout — requests/s, events/s (accepted by the collector and
# acknowledged by the broker), p50/p99 latency (wrk), collector CPU (% of one core, averaged
# over the run) and RSS (peak) — plus the exact wrk commands; progress on stderr.
#
# Env:  BENCH_SCALE        (default 1) multiplies the run duration (15 s); 0.2 = smoke run.
#       BENCH_CONNECTIONS  (default 64) wrk connections;  BENCH_THREADS (default 1) wrk threads.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${BENCH_SCALE:-1}
CONNS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-1}
DUR=$(awk -v k="$SCALE" 'BEGIN { v = int(15 * k); if (v < 2) v = 2; print v }')

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if ! command -v wrk >/dev/null 2>&1; then
  log "installing wrk"
  if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk </dev/null >&2
fi

TMP=$(mktemp -d /tmp/qanat-collect-bench.XXXXXX)
PIDS=()
cleanup() {
  set +e
  stop_pids "${PIDS[@]}"
  rm -rf "$TMP"
}
trap cleanup EXIT

build_release qanat
QANAT="$QANAT_BIN"

mkdir -p "$TMP/data"
"$QANAT" broker --data-dir "$TMP/data" --listen 127.0.0.1:0 >"$TMP/broker.out" 2>"$TMP/broker.err" &
PIDS+=($!)
BOOTSTRAP=$(wait_line "$TMP/broker.out" "qanat broker listening on ") ||
  die "no 'qanat broker listening on' line in $TMP/broker.out"
log "broker on $BOOTSTRAP"

cat >"$TMP/collect.toml" <<EOF
[server]
listen = "127.0.0.1:0"
max_batch_events = 1000

[kafka]
bootstrap = "$BOOTSTRAP"

[[routes]]
name = "web"
topic = "bench.web"
apps = ["web"]
buffer = 100000

[[routes]]
name = "app"
topic = "bench.app"
buffer = 100000
EOF
QANAT_LOG=warn "$QANAT" collect --config "$TMP/collect.toml" --metrics-listen 127.0.0.1:0 \
  >"$TMP/collect.out" 2>"$TMP/collect.err" &
COLLECTOR=$!
PIDS=("$COLLECTOR" "${PIDS[@]}") # stopped first
ADDR=$(wait_line "$TMP/collect.out" "qanat collect listening on ") ||
  die "no 'qanat collect listening on' line in $TMP/collect.out"
METRICS=$(wait_line "$TMP/collect.out" "qanat metrics listening on ") ||
  die "no 'qanat metrics listening on' line in $TMP/collect.out"
log "collector on $ADDR (metrics $METRICS)"

# metric_sum NAME FILTER: sum of the samples of NAME whose labels contain FILTER.
metric_sum() {
  curl -s "http://$METRICS/metrics" |
    awk -v n="$1" -v f="$2" 'index($0, n) == 1 && index($0, f) > 0 { s += $NF } END { printf "%d\n", s }'
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$COLLECTOR/stat"; }
CLK_TCK=$(getconf CLK_TCK)

UA="Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"

cat >"$TMP/batch.lua" <<'EOF'
-- POST /v1/events: 50 events per batch (20 page views, 20 clicks, 10 custom events).
local events = {}
for i = 1, 50 do
  local e
  if i % 5 == 0 then
    e = string.format('{"type":"custom","name":"video_play","duration_ms":%d,"properties":{"video":"v%d"},"page":{"name":"video"}}', i * 10, i)
  elseif i % 2 == 0 then
    e = string.format('{"type":"click","page":{"name":"home"},"control":"item_%d","params":{"sku":"S%d"},"spm":"shop.home.list.%d"}', i, i, i)
  else
    e = string.format('{"type":"page_view","page":{"name":"item","params":{"sku":"S%d"}},"referrer_chain":["search","home"],"ts":1700000000%03d}', i, i)
  end
  events[#events + 1] = e
end
local body = '{"app":"shop-android","device":{"id":"%s","os":"Android","model":"Pixel 8"},"user":{"id":"u-1"},"events":[' .. table.concat(events, ",") .. ']}'
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/events", { ["Content-Type"] = "application/json" }, string.format(body, "dev-" .. (n % 1000)))
end
EOF

cat >"$TMP/beacon.lua" <<'EOF'
-- GET /t.gif: a page view from one of 1000 visitors.
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/t.gif?t=page_view&app=web&vid=v" .. (n % 1000) ..
    "&url=https%3A%2F%2Fshop.example%2Fitem%3Fid%3D42&ref=https%3A%2F%2Fsearch.example%2F" ..
    "&spm=shop.item.list.7&sr=1920x1080&lang=en-US&resp=204")
end
EOF

ROWS=()
CMDS=()
# run NAME LUA EVENTS_PER_REQUEST
run() {
  local name=$1 lua=$2
  local acc0 ok0 t0 cpu0 t1 cpu1 acc1 out
  acc0=$(metric_sum qanat_collect_route_events_total 'outcome="accepted"')
  ok0=$(metric_sum qanat_collect_produced_total 'result="ok"')
  cpu0=$(cpu_ticks)
  t0=$(date +%s.%N)
  local cmd=(wrk -t"$THREADS" -c"$CONNS" -d"${DUR}s" --latency -H "User-Agent: $UA" -s "$lua" "http://$ADDR")
  CMDS+=("${cmd[*]}")
  log "$name: ${cmd[*]}"
  out=$("${cmd[@]}")
  t1=$(date +%s.%N)
  cpu1=$(cpu_ticks)
  echo "$out" >&2
  acc1=$(metric_sum qanat_collect_route_events_total 'outcome="accepted"')
  # Every accepted event must reach the broker (bounded wait).
  local ok1
  for _ in $(seq 600); do
    ok1=$(metric_sum qanat_collect_produced_total 'result="ok"')
    [ $((ok1 - ok0)) -ge $((acc1 - acc0)) ] && break
    sleep 0.1
  done
  local secs rps p50 p99 errs events eps cpu rss
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  rps=$(echo "$out" | awk '/^Requests\/sec:/ { printf "%d", $2 }')
  p50=$(echo "$out" | awk '$1 == "50%" { print $2 }')
  p99=$(echo "$out" | awk '$1 == "99%" { print $2 }')
  errs=$(echo "$out" | awk '/Non-2xx/ { print $NF } /Socket errors/ { print "socket errors" }' | paste -sd' ')
  events=$((acc1 - acc0))
  eps=$(awk -v e="$events" -v s="$secs" 'BEGIN { printf "%d", e / s }')
  cpu=$(awk -v c=$((cpu1 - cpu0)) -v t="$CLK_TCK" -v s="$secs" 'BEGIN { printf "%.0f%%", 100 * c / t / s }')
  rss=$(awk '/VmHWM/ { printf "%.0f MiB", $2 / 1024 }' "/proc/$COLLECTOR/status")
  ROWS+=("| $name | $rps | $eps | $p50 | $p99 | $cpu | $rss | $((ok1 - ok0)) / $events | ${errs:-none} |")
}

run "GET /t.gif beacon" "$TMP/beacon.lua"
run "POST /v1/events, 50 events" "$TMP/batch.lua"

echo
echo "qanat collect, wrk $THREADS thread(s) x $CONNS connections x ${DUR}s, broker on the same $(nproc)-core machine"
echo
echo "| workload | requests/s | events/s | p50 | p99 | collector CPU | collector RSS (peak) | acked by broker / accepted | non-2xx |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
echo
printf 'command: %s\n' "${CMDS[@]}"
