#!/usr/bin/env bash
# Single-stream tokens/s: batchgen (through gRPC, as a client sees it) against
# plain ORT loops in Rust (examples/ort_loop.rs: the export, and the built graph
# batchgen serves), and one in Python over the export
# on the same model, library and threads,
# alternating so both see the same machine state.
#   scripts/bench_single_stream.sh MODEL_DIR [THREADS] [ROUNDS]
# Needs a release build (cargo build --release --examples) and python3 with
# onnxruntime==1.32.0 and numpy (PYTHON=...); BATCHGEN_BIN_DIR: see scripts/lib.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
model=$1; threads=${2:-2}; rounds=${3:-3}
python=${PYTHON:-python3}
port=50077
log=$(mktemp)
trap 'kill $pid 2>/dev/null; rm -f "$log"' EXIT
start=$(date +%s%N)
serve_ready "$bin/batchgen" "$log" --model "$model" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:0 \
  --intra-op-threads "$threads"
require_built "$log"
echo "batchgen ready in $(( ($(date +%s%N) - start) / 1000000 )) ms (process start to ready)"
for r in $(seq "$rounds"); do
  echo "== round $r: batchgen"
  "$bin/examples/single_stream" http://127.0.0.1:$port 32 128 2
  echo "== round $r: plain ORT loop in Rust over the export (examples/ort_loop.rs; server idle)"
  "$bin/examples/ort_loop" "$model" "$threads" 128 2
  echo "== round $r: plain ORT loop in Rust over the built graph (what batchgen serves)"
  "$bin/examples/ort_loop" "$model" "$threads" 128 2 built | grep run
  echo "== round $r: plain ONNX Runtime loop (Python)"
  "$python" scripts/ort_loop.py "$model" --prompt-tokens 32 --new-tokens 128 --threads "$threads" --runs 2 | grep run
done
