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
#   5. after each run, waits until the broker has acknowledged every accepted event;
#   6. the same beacon load against nginx `empty_gif` with an access log (the reference a
#      pixel server is measured against), when nginx is installed.
# Output: one markdown table on stdout — requests/s, events/s (accepted by the collector and
# acknowledged by the broker), p50/p99 latency (wrk), server CPU (% of one core, averaged
# over the run, and CPU µs per request) and RSS (peak) — plus the exact wrk commands and the
# load average; progress on stderr.
#
# Env:  BENCH_SCALE        (default 1) multiplies the run duration (15 s); 0.2 = smoke run.
#       BENCH_CONNECTIONS  (default 64) wrk connections;  BENCH_THREADS (default 1) wrk threads.
#       BENCH_NGINX        (default 1) 0 skips the nginx run; NGINX (default `nginx`) its binary.
#       QANAT_BIN          a prebuilt qanat to measure instead of building this tree's.
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

if [ -n "${QANAT_BIN:-}" ]; then
  QANAT="$QANAT_BIN"
else
  build_release qanat
  QANAT="$QANAT_BIN"
fi

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
# cpu_ticks PID...: user + system clock ticks of the processes.
cpu_ticks() {
  local pid t=0
  for pid in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$pid/stat"))); done
  echo "$t"
}
# peak_rss PID...: the sum of the processes' peak RSS.
peak_rss() {
  local pid
  for pid in "$@"; do cat "/proc/$pid/status"; done |
    awk '/VmHWM/ { k += $2 } END { printf "%.0f MiB", k / 1024 }'
}

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
# run NAME LUA [ADDR PID...]: wrk against the collector (or, given ADDR and PIDs, against
# another server whose CPU and RSS are those processes').
run() {
  local name=$1 lua=$2 addr=${3:-$ADDR}
  shift 2
  [ $# -gt 0 ] && shift
  local pids=("$@") collector=0
  if [ ${#pids[@]} -eq 0 ]; then
    pids=("$COLLECTOR")
    collector=1
  fi
  local acc0=0 ok0=0 t0 cpu0 t1 cpu1 acc1=0 out
  if [ $collector -eq 1 ]; then
    acc0=$(metric_sum qanat_collect_route_events_total 'outcome="accepted"')
    ok0=$(metric_sum qanat_collect_produced_total 'result="ok"')
  fi
  cpu0=$(cpu_ticks "${pids[@]}")
  t0=$(date +%s.%N)
  local cmd=(wrk -t"$THREADS" -c"$CONNS" -d"${DUR}s" --latency -H "User-Agent: $UA" -s "$lua" "http://$addr")
  CMDS+=("${cmd[*]}")
  log "$name: ${cmd[*]}"
  out=$("${cmd[@]}")
  t1=$(date +%s.%N)
  cpu1=$(cpu_ticks "${pids[@]}")
  echo "$out" >&2
  local ok1=0
  if [ $collector -eq 1 ]; then
    acc1=$(metric_sum qanat_collect_route_events_total 'outcome="accepted"')
    # Every accepted event must reach the broker (bounded wait).
    for _ in $(seq 600); do
      ok1=$(metric_sum qanat_collect_produced_total 'result="ok"')
      [ $((ok1 - ok0)) -ge $((acc1 - acc0)) ] && break
      sleep 0.1
    done
  fi
  local secs rps p50 p99 errs events eps cpu us rss acked
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  rps=$(echo "$out" | awk '/^Requests\/sec:/ { printf "%d", $2 }')
  p50=$(echo "$out" | awk '$1 == "50%" { print $2 }')
  p99=$(echo "$out" | awk '$1 == "99%" { print $2 }')
  errs=$(echo "$out" | awk '/Non-2xx/ { print $NF } /Socket errors/ { print "socket errors" }' | paste -sd' ')
  events=$((acc1 - acc0))
  eps=$(awk -v e="$events" -v s="$secs" 'BEGIN { printf "%d", e / s }')
  cpu=$(awk -v c=$((cpu1 - cpu0)) -v t="$CLK_TCK" -v s="$secs" 'BEGIN { printf "%.0f%%", 100 * c / t / s }')
  us=$(echo "$out" | awk -v c=$((cpu1 - cpu0)) -v t="$CLK_TCK" \
    '$2 == "requests" && $3 == "in" { n = $1 } END { if (n > 0) printf "%.1f", 1e6 * c / t / n; else print "-" }')
  rss=$(peak_rss "${pids[@]}")
  if [ $collector -eq 1 ]; then acked="$((ok1 - ok0)) / $events"; else acked="-"; eps="-"; fi
  ROWS+=("| $name | $rps | $eps | $p50 | $p99 | $cpu | $us | $rss | $acked | ${errs:-none} |")
}

run "GET /t.gif beacon" "$TMP/beacon.lua"
run "POST /v1/events, 50 events" "$TMP/batch.lua"

NGINX=${NGINX:-nginx}
if [ "${BENCH_NGINX:-1}" != 0 ] && command -v "$NGINX" >/dev/null 2>&1; then
  # nginx serving the same pixel: empty_gif, the same no-cache headers, the default combined
  # access log written per request, one worker per core, keep-alive as long as wrk likes.
  NGINX_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$TMP/nginx"
  cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log $TMP/nginx/access.log combined;
  keepalive_requests 1000000;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location = /t.gif {
      empty_gif;
      add_header Cache-Control "no-cache, no-store, must-revalidate, max-age=0";
      add_header Pragma no-cache;
      expires epoch;
    }
  }
}
EOF
  "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" 2>"$TMP/nginx/stderr" &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$NGINX_PORT/t.gif" && break
    sleep 0.1
  done
  mapfile -t NGINX_PIDS < <(echo "$NGINX_PID"; pgrep -P "$NGINX_PID")
  log "nginx on 127.0.0.1:$NGINX_PORT (pids ${NGINX_PIDS[*]})"
  run "nginx empty_gif + access log, same beacons" "$TMP/beacon.lua" "127.0.0.1:$NGINX_PORT" "${NGINX_PIDS[@]}"
else
  log "nginx not run (BENCH_NGINX=0 or no $NGINX binary)"
fi

echo
echo "qanat collect, wrk $THREADS thread(s) x $CONNS connections x ${DUR}s, broker on the same $(nproc)-core machine"
echo
echo "| workload | requests/s | events/s | p50 | p99 | server CPU | CPU µs/request | server RSS (peak) | acked by broker / accepted | non-2xx |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
echo
printf 'command: %s\n' "${CMDS[@]}"
echo "load average at the end: $(cat /proc/loadavg)"
