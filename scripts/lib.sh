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
  # The HTTP front (default 0.0.0.0:8000) is not what the benchmarks measure:
  # off, where the binary has one (older binaries compared with do not).
  local http=()
  if [[ " $* " != *" --http-listen "* ]] && "$binary" serve --help 2>/dev/null | grep -q -- --http-listen; then
    http=(--http-listen off)
  fi
  "$binary" serve "$@" "${http[@]}" >"$log" 2>&1 &
  pid=$!
  local deadline=$((SECONDS + ${READY_TIMEOUT:-120}))
  # "ready in N s: serving ..." (older binaries compared with: "serving (ready").
  until grep -qE "^.*(ready in [0-9.]+ s: serving|serving \(ready)" "$log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$log"; echo "$binary exited before it was ready" >&2; exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      cat "$log"; kill "$pid"; echo "$binary was not ready within ${READY_TIMEOUT:-120} s" >&2; exit 1
    fi
    sleep 0.05
  done
}

# require_built LOG: stops the benchmark when this tree's server fell back to
# the export's graph (`--graph auto` when it cannot read the weights), which
# would otherwise be measured as if it were batchgen's own graph.
require_built() {
  if ! grep -q "built graph: one session" "$1"; then
    grep -E "WARN|ERROR" "$1" >&2 || true
    kill "$pid" 2>/dev/null || true
    echo "the server did not build batchgen's own graph (see its log above)" >&2; exit 1
  fi
}

# cpu_info: the CPU's model name and the SIMD flags that decide the speed (every
# benchmark states them).
cpu_info() {
  grep -m1 "model name" /proc/cpuinfo
  grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_vnni|avx_vnni|fma)$' | tr '\n' ' '; echo
}

# bench_summary [LABEL]: reads `batchgen bench --json` on stdin and prints one
# line per level: "MODE VALUE: ..." or, with a label, "LABEL cVALUE: ...".
bench_summary() {
  python3 -c '
import json, sys
label = sys.argv[1] if len(sys.argv) > 1 else None
for l in json.load(sys.stdin):
    t, i = l["ttft_seconds"], l["itl_seconds"]
    name = "%s c%g" % (label, l["value"]) if label else "%s %g" % (l["mode"], l["value"])
    print("  %s: %.1f tok/s, TTFT p50/p99 %.0f/%.0f ms, ITL p50/p99 %.1f/%.1f ms, failed %d" % (
        name, l["tokens_per_second"], t["p50"] * 1e3, t["p99"] * 1e3,
        i["p50"] * 1e3, i["p99"] * 1e3, l["failed"]))
' "$@"
}
