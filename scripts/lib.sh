# Sourced by the benchmark scripts: where the binaries are, and a server
# started and waited for with a bound, so no script can hang on a server that
# never gets ready.
#   BATCHGEN_BIN_DIR  directory of batchgen and examples/ (default ./target/release)
#   READY_TIMEOUT     seconds a server may take to be ready (default 120)
bin=${BATCHGEN_BIN_DIR:-./target/release}

# serve_ready BINARY LOG ARGS...: starts `BINARY serve ARGS...` with its log in
# LOG, sets $pid, and returns once it logs that it is ready.
serve_ready() {
  local binary=$1 log=$2
  shift 2
  "$binary" serve "$@" >"$log" 2>&1 &
  pid=$!
  local deadline=$((SECONDS + ${READY_TIMEOUT:-120}))
  until grep -q "serving (ready" "$log"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$log"; echo "$binary exited before it was ready" >&2; exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      cat "$log"; kill "$pid"; echo "$binary was not ready within ${READY_TIMEOUT:-120} s" >&2; exit 1
    fi
    sleep 0.05
  done
}
