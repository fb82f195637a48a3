#!/usr/bin/env bash
# Single-stream tokens/s: batchgen (through gRPC, as a client sees it) against
# a plain ORT loop in Rust (examples/ort_loop.rs), and one in Python
# on the same model, library and threads,
# alternating so both see the same machine state.
#   scripts/bench_single_stream.sh MODEL_DIR [THREADS] [ROUNDS]
# Needs a release build (cargo build --release --examples) and python3 with
# onnxruntime==1.32.0 and numpy.
set -euo pipefail
model=$1; threads=${2:-2}; rounds=${3:-3}
python=${PYTHON:-python3}
port=50077
start=$(date +%s.%N)
./target/release/batchgen serve --model "$model" --listen 127.0.0.1:$port --intra-op-threads "$threads" \
  > /tmp/batchgen-bench.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
until grep -q "serving (ready" /tmp/batchgen-bench.log; do
  kill -0 $pid 2>/dev/null || { cat /tmp/batchgen-bench.log; exit 1; }
  sleep 0.05
done
echo "batchgen ready in $(echo "$(date +%s.%N) - $start" | bc) s (process start to listening)"
for r in $(seq "$rounds"); do
  echo "== round $r: batchgen"
  ./target/release/examples/single_stream http://127.0.0.1:$port 32 128 2
  echo "== round $r: plain ORT loop in Rust (examples/ort_loop.rs; server idle)"
  ./target/release/examples/ort_loop "$model" "$threads" 128 2
  echo "== round $r: plain ONNX Runtime loop (Python)"
  "$python" scripts/ort_loop.py "$model" --prompt-tokens 32 --new-tokens 128 --threads "$threads" --runs 2 | grep run
done
