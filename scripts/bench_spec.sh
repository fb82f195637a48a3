#!/usr/bin/env bash
# The speculative-decoding benchmark of docs/performance.md ("Speculative
# decoding"): one release server (--spec-tokens K, adaptive), the same loads
# with speculation off and on per request (Decoding.speculation, `bench
# --speculation`), interleaved off, on, off, on in one pass so the spread of
# each pair is the noise; then the server's acceptance counters.
#   scripts/bench_spec.sh MODEL_DIR [THREADS] [REQUESTS]
# Loads: 32-token prompts, NEW (128) new tokens, EOS ignored, at LEVELS (1,16):
#   greedy     the model's own greedy output (a random-weight model loops,
#              which prompt lookup predicts: the copying workload we can make)
#   repeat     greedy after a prompt holding a COPY-token (200) passage twice:
#              prompt lookup proposes the passage again, which a random model
#              does not follow (what wrong guesses cost, and how fast the
#              adaptive rule stops making them)
#   sampled    temperature 1 (no repetition to predict: speculation must not cost)
# Environment: NEW (128), LEVELS (1,16), K (12), COPY (200), WEIGHTS (fp32), KV (fp32).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
model=$1; threads=${2:-2}; requests=${3:-16}
new=${NEW:-128}; levels=${LEVELS:-1,16}; k=${K:-12}; copy=${COPY:-200}
port=50097
dir=$(mktemp -d)
log=$dir/server.log
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
cpu_info
metrics=$((port + 1))
serve_ready "$bin/batchgen" "$log" --model "$model" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:$metrics \
  --intra-op-threads "$threads" --spec-tokens "$k" --weights "${WEIGHTS:-fp32}" --kv-dtype "${KV:-fp32}"
require_built "$log"
scrape() { curl -sf "127.0.0.1:$metrics/metrics"; }
sum() { scrape | awk -v m="$1" '$1 == m { s += $2 } END { printf "%d", s }'; }
for load in greedy repeat sampled; do
  args=(--prompt-tokens 32)
  case $load in
    repeat) args=(--prompt-tokens "$copy" --repeat-prompt) ;;
    sampled) args+=(--temperature 1) ;;
  esac
  for round in 1 2; do
    for spec in off on; do
      p0=$(sum batchgen_spec_proposed_tokens_total); a0=$(sum batchgen_spec_accepted_tokens_total)
      "$bin/batchgen" bench --target http://127.0.0.1:$port --no-sequential --concurrency "$levels" \
        --requests "$requests" --new-tokens "$new" --speculation "$spec" --json "${args[@]}" 2>/dev/null \
        | bench_summary "$load $spec #$round"
      p1=$(sum batchgen_spec_proposed_tokens_total); a1=$(sum batchgen_spec_accepted_tokens_total)
      if [ "$spec" = on ]; then echo "  $load on #$round: $((a1 - a0)) of $((p1 - p0)) proposed tokens accepted"; fi
    done
  done
done
kill "$pid"; wait "$pid" 2>/dev/null || true
trap - EXIT
rm -rf "$dir"
