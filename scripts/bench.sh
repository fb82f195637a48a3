#!/usr/bin/env bash
# The continuous-batching benchmark of docs/performance.md: `batchgen bench` against
# a release server, with the plain ORT loop (examples/ort_loop.rs) run before
# and after it on the same machine, and the server's own breakdown of where
# step time goes (its "busy period" log lines). The report starts with the
# machine's roofline and gives each level its "% of the bound" (--roofline).
#   scripts/bench.sh MODEL_DIR [THREADS] [CONCURRENCY]
# Needs: cargo build --release --all-targets (or BATCHGEN_BIN_DIR, see scripts/lib.sh)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
model=$1; threads=${2:-2}; levels=${3:-1,4,16,32}
port=50088
log=$(mktemp)
trap 'kill $pid 2>/dev/null; rm -f "$log"' EXIT
serve_ready "$bin/batchgen" "$log" --model "$model" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:0 --intra-op-threads "$threads"
echo "== plain ORT loop, before (server idle)"
"$bin/examples/ort_loop" "$model" "$threads" 128 3
echo "== batchgen bench --roofline --concurrency $levels"
"$bin/batchgen" bench --target http://127.0.0.1:$port --concurrency "$levels" --roofline --roofline-threads "$threads" 2>/dev/null
echo "== plain ORT loop, after (server idle)"
"$bin/examples/ort_loop" "$model" "$threads" 128 3
echo "== server: where the step time went, per busy period"
sed 's/\x1b\[[0-9;]*m//g' "$log" | grep "busy period" | sed 's/.*busy period: //' | awk '!/1.00 rows\/step/ || !seen++'
echo "== resident memory of the server (VmRSS, VmHWM)"
grep -E "VmRSS|VmHWM" /proc/$pid/status
