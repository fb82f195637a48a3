#!/usr/bin/env bash
# Engine v2 against the engine before it, in one pass on one machine: the same
# loads through `batchgen bench` on an OLD server binary (left-padded cache,
# the export's graph) and on this tree's server (its own graph over the slot
# cache), alternating, plus each server's peak resident memory (VmHWM).
#   scripts/bench_engine.sh MODEL_DIR OLD_BATCHGEN[:OLDER...] [THREADS] [ROUNDS]
# MODEL_DIR: an optimum export of the 124M shape (scripts/make_fixture.py --shape 124m).
# OLD_BATCHGEN: release binaries of the commits to compare with (e.g. built in git
# worktrees), separated by colons; each is run in turn, then this tree's.
# Needs: cargo build --release --bin batchgen --examples
# DECODE=0 skips the decode-step table, LOADS=0 the two loads, MEMORY=0 the memory
# against workers, SINGLE=0 the single-stream loop. Sizes: LONG_PROMPT (500),
# LONG_NEW (64), SHORT_NEW (128), MEMORY_PROMPT (200), REQUESTS (32) per load.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
model=$1; olds=${2//:/ }; threads=${3:-2}; rounds=${4:-1}
new=${NEW_BATCHGEN:-$bin/batchgen}
examples=${EXAMPLES:-$bin/examples}
long=${LONG_PROMPT:-500}; long_new=${LONG_NEW:-64}; short_new=${SHORT_NEW:-128}
mem_prompt=${MEMORY_PROMPT:-200}; requests=${REQUESTS:-32}
port=50099
cpu_info

serve() { # binary, log, [workers]; starts a server and waits until it is ready
  serve_ready "$1" "$2" --model "$model" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:0 \
    --intra-op-threads "$threads" --workers "${3:-1}"
  if [ "$1" = "$new" ]; then require_built "$2"; fi
}

load() { # name, bench args...
  local name=$1; shift
  echo "--- $name: $*"
  "$new" bench --target http://127.0.0.1:$port --json "$@" 2>/dev/null | bench_summary
}

if [ "${DECODE:-1}" = 1 ]; then
  echo "== decode step against context, 16 rows, nothing prefilling (examples/decode_context)"
  "$examples/decode_context" "$model" "$threads" 16 "$rounds"
fi
[ "${LOADS:-1}" = 1 ] && for round in $(seq "$rounds"); do
  for bin in $olds $new; do
    log=$(mktemp)
    serve "$bin" "$log"
    echo "== round $round: $bin"
    grep -E "VmRSS" /proc/$pid/status | sed 's/^/  idle /'
    load "long prompts" --concurrency 16 --prompt-tokens "$long" --new-tokens "$long_new" --requests "$requests"
    load "short prompts" --concurrency 16 --prompt-tokens 32 --new-tokens "$short_new" --requests "$requests"
    grep -E "VmHWM" /proc/$pid/status | sed 's/^/  peak /'
    kill $pid; wait $pid 2>/dev/null || true
    rm -f "$log"
  done
done
[ "${MEMORY:-1}" = 1 ] && echo "== memory against workers (one set of weights shared by the built graph's sessions)"
[ "${MEMORY:-1}" = 1 ] && for bin in $olds $new; do
  for workers in 1 2 4; do
    log=$(mktemp)
    serve "$bin" "$log" "$workers"
    idle=$(grep VmRSS /proc/$pid/status | awk '{print $2}')
    "$new" bench --target http://127.0.0.1:$port --concurrency 16 --prompt-tokens "$mem_prompt" --new-tokens 32 --requests "$requests" \
      >/dev/null 2>&1
    peak=$(grep VmHWM /proc/$pid/status | awk '{print $2}')
    echo "  $bin, $workers worker(s): idle RSS $((idle / 1024)) MiB, peak under load $((peak / 1024)) MiB"
    kill $pid; wait $pid 2>/dev/null || true
    rm -f "$log"
  done
done
if [ "${SINGLE:-1}" = 1 ]; then
  echo "== single stream: built graph without a server (examples/ort_loop ... built)"
  "$examples/ort_loop" "$model" "$threads" 128 3 built
fi
