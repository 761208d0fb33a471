# bench/lib.sh — helpers shared by the bench/*.sh scripts (sourced, not run).
# Set BENCH_TAG before sourcing to label log lines (default "bench").

log() { echo "[${BENCH_TAG:-bench} $(date +%H:%M:%S)] $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# stop_pids PID...: SIGTERM each, give it up to 5 s to exit, then SIGKILL.
stop_pids() {
  local pid
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "$@"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

# build_release PACKAGE...: cargo build --release in the repo at $ROOT; sets TARGET_DIR,
# QANAT_BIN and BENCH_BIN (the latter two whether or not they were among the packages).
# With BENCH_SKIP_BUILD set, the release binaries already built are used as they are.
build_release() {
  local args=() p
  for p in "$@"; do args+=(-p "$p"); done
  if [[ -n "${BENCH_SKIP_BUILD:-}" ]]; then
    log "not building (BENCH_SKIP_BUILD): using the release binaries as they are"
  else
    log "building (cargo build --release ${args[*]})"
    (cd "$ROOT" && cargo build --release "${args[@]}" >&2)
  fi
  TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  QANAT_BIN="$TARGET_DIR/release/qanat"
  BENCH_BIN="$TARGET_DIR/release/qanat-bench"
  [[ -x "$QANAT_BIN" ]] || die "qanat not found in $TARGET_DIR/release"
}

# broker_under_test: after build_release, let BENCH_QANAT_BIN name another broker build to
# measure (A/B comparisons) while the clients stay this tree's.
broker_under_test() {
  QANAT_BIN=${BENCH_QANAT_BIN:-$QANAT_BIN}
  [[ -x "$QANAT_BIN" ]] || die "BENCH_QANAT_BIN $QANAT_BIN is not executable"
}

# wait_line FILE PREFIX [PID]: print what follows PREFIX on the first line of FILE that starts
# with it, waiting up to 60 s (and giving up early if PID exits).
wait_line() {
  local v
  for _ in $(seq 600); do
    v=$(sed -n "s/^$2//p" "$1" 2>/dev/null | head -n1)
    if [ -n "$v" ]; then
      echo "$v"
      return 0
    fi
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then
      break
    fi
    sleep 0.1
  done
  return 1
}

# warn_guest_memory: on a virtual machine whose balloon reports free pages to the host
# (virtio-balloon free page reporting), memory the guest frees (deleted files' page cache,
# exited processes) goes back to the host, and the next use of it takes a host page fault: a
# write into the page cache then runs at a fraction of memory speed (seen: 330 MB/s against
# 3.9 GB/s for `dd` into the page cache), and figures that write a lot vary from run to run.
# Says so on stderr; changes nothing. Writing 11 to the parameter below (as root) stops the
# reporting, and touching all memory once afterwards (e.g. a process that fills most of it)
# keeps it backed for the runs.
warn_guest_memory() {
  local order=/sys/module/page_reporting/parameters/page_reporting_order
  [[ -r $order ]] || return 0
  if (($(cat "$order") <= 10)); then
    log "note: free page reporting is on ($order = $(cat "$order")): memory freed between runs is given back to the host, and writes into it run slowly until it is backed again"
  fi
}

# cpu_times: this machine's steal time and all its CPU time so far, in ticks of /proc/stat.
# steal_since STEAL TOTAL: the share of the CPU time since that `cpu_times` reading that the
# host gave to others while this guest had work to run (top's %st). A run with a high share
# was slowed by the host, not by the code under test: compare runs only at similar shares.
cpu_times() {
  local _cpu user nice sys idle iowait irq softirq steal _rest
  read -r _cpu user nice sys idle iowait irq softirq steal _rest </proc/stat
  echo "$steal $((user + nice + sys + idle + iowait + irq + softirq + steal))"
}
steal_since() {
  local s1 t1
  read -r s1 t1 < <(cpu_times)
  awk -v s=$((s1 - $1)) -v t=$((t1 - $2)) 'BEGIN { if (t <= 0) print "-"; else printf "%.1f%%\n", 100 * s / t }'
}

# cpu_secs PID: the process's CPU time so far (utime + stime, every thread) in seconds; 0 once
# it is gone. Fields 14 and 15 of /proc/PID/stat, counted after the last ')' (comm may hold
# spaces).
CLK_TCK=$(getconf CLK_TCK)
cpu_secs() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  stat=${stat##*) }
  awk -v t="$CLK_TCK" '{ printf "%.2f", ($12 + $13) / t }' <<<"$stat"
}

# vm_hwm_kb PID: the process's peak RSS (VmHWM) in KiB; 0 once it is gone.
vm_hwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# vm_hwm_mib PID: the same in MiB, one decimal; - once it is gone.
vm_hwm_mib() { awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo -; }
# median: the median of the numbers on stdin (space- or line-separated); - when there are none.
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# machine_start: note the load average and CPU times at the start of a run (LOAD_START,
# STEAL_START, TOTAL_START). machine_summary: the machine's cores, load average at start and
# now, and the host's steal share of CPU time since machine_start, in one line.
machine_start() {
  LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
  read -r STEAL_START TOTAL_START < <(cpu_times)
}
machine_summary() {
  echo "$(nproc) cores; load average (1/5/15 min) at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg); host steal $(steal_since "$STEAL_START" "$TOTAL_START") of CPU time over the run"
}

# start_tmp NAME: a temp dir in $TMP (under BENCH_TMPDIR, default /tmp), an empty PIDS array,
# and traps that stop every pid in PIDS, call cleanup_extra if the script defines it, and
# remove the temp dir on exit. Warns about guest memory handed back to the host.
start_tmp() {
  warn_guest_memory
  TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

bench_cleanup() {
  local rc=$?
  set +e
  stop_pids "${PIDS[@]}"
  if declare -F cleanup_extra >/dev/null; then cleanup_extra; fi
  rm -rf "$TMP"
  exit "$rc"
}
