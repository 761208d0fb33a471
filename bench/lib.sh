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
build_release() {
  local args=() p
  for p in "$@"; do args+=(-p "$p"); done
  log "building (cargo build --release ${args[*]})"
  (cd "$ROOT" && cargo build --release "${args[@]}" >&2)
  TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  QANAT_BIN="$TARGET_DIR/release/qanat"
  BENCH_BIN="$TARGET_DIR/release/qanat-bench"
  [[ -x "$QANAT_BIN" ]] || die "qanat not found in $TARGET_DIR/release"
}
